/// Writes UTF-8 text into memory a `String` was allocated with (`String(unsafeUninitializedCapacity:)`), for
/// text built on the hot path in one pass: a message's JSON, a cursor, a timestamp. The caller sizes the
/// buffer; each write checks it stays inside.
struct TextWriter {
    private let buffer: UnsafeMutableBufferPointer<UInt8>
    private(set) var count = 0

    init(_ buffer: UnsafeMutableBufferPointer<UInt8>) {
        self.buffer = buffer
    }

    mutating func byte(_ value: UInt8) {
        precondition(count < buffer.count)
        buffer[count] = value
        count += 1
    }

    mutating func ascii(_ text: StaticString) {
        text.withUTF8Buffer { bytes(UnsafeRawBufferPointer($0)) }
    }

    mutating func text(_ value: String) {
        if value.utf8.withContiguousStorageIfAvailable({ bytes(UnsafeRawBufferPointer($0)) }) == nil {
            for unit in value.utf8 { byte(unit) }
        }
    }

    mutating func bytes(_ source: UnsafeRawBufferPointer) {
        precondition(count + source.count <= buffer.count)
        if let base = source.baseAddress, source.count > 0 {
            UnsafeMutableRawPointer(buffer.baseAddress! + count).copyMemory(from: base, byteCount: source.count)
        }
        count += source.count
    }

    /// A decimal integer (at most 20 bytes).
    mutating func integer(_ value: Int64) {
        if value < 0 { byte(0x2D) }
        var width = 0
        var rest = value.magnitude
        repeat { width += 1; rest /= 10 } while rest > 0
        digits(value.magnitude, width: width)
    }

    /// `value` zero-padded to `width` digits.
    mutating func digits(_ value: some BinaryInteger, width: Int) {
        precondition(count + width <= buffer.count)
        var value = value
        for i in stride(from: count + width - 1, through: count, by: -1) {
            buffer[i] = UInt8(truncatingIfNeeded: 0x30 + value % 10)
            value /= 10
        }
        count += width
    }

    /// The low `width` hex digits of `value`, lowercase.
    mutating func hex(_ value: UInt64, width: Int = 16) {
        for shift in stride(from: 4 * (width - 1), through: 0, by: -4) {
            let digit = UInt8(truncatingIfNeeded: (value >> UInt64(shift)) & 0xF)
            byte(digit < 10 ? 0x30 + digit : 0x57 + digit)
        }
    }
}

extension String {
    /// Text written by `write` into at most `capacity` bytes.
    init(capacity: Int, _ write: (inout TextWriter) -> Void) {
        self.init(unsafeUninitializedCapacity: capacity) { buffer in
            var writer = TextWriter(buffer)
            write(&writer)
            return writer.count
        }
    }
}
