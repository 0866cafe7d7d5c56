/// A map for the few entries one connection holds (its subscriptions): pairs in an array, found by a linear
/// scan. A `Dictionary` of one entry allocates a hash table of several buckets; at thousands of idle
/// connections that is hundreds of bytes each (heaptrack, `make bench`'s idle figure).
struct SmallMap<Key: Equatable, Value> {
    private var pairs: [(key: Key, value: Value)] = []

    var count: Int { pairs.count }
    var isEmpty: Bool { pairs.isEmpty }
    var keys: [Key] { pairs.map(\.key) }
    var values: [Value] { pairs.map(\.value) }

    subscript(key: Key) -> Value? {
        get { pairs.first { $0.key == key }?.value }
        set {
            if let index = pairs.firstIndex(where: { $0.key == key }) {
                if let newValue { pairs[index].value = newValue } else { pairs.remove(at: index) }
            } else if let newValue {
                pairs.append((key, newValue))
            }
        }
    }

    @discardableResult
    mutating func removeValue(forKey key: Key) -> Value? {
        guard let index = pairs.firstIndex(where: { $0.key == key }) else { return nil }
        return pairs.remove(at: index).value
    }

    mutating func removeAll() { pairs = [] }
}
