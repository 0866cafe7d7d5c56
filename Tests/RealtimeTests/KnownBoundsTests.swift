@testable import ChatDomain
import Foundation
import Logging
import NIOConcurrencyHelpers
import Testing

/// The embedded store answers a channel's head and floor from memory once it has read them: a commit raises
/// the head before the commit observer (the Hub) hears of its messages, a trim raises the floor, and nothing
/// moves backwards whatever order racing updates arrive in.
@Suite struct KnownBoundsTests {
    static func openStore() async throws -> (SQLiteStore, String) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-bounds-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return (try await SQLiteStore.open(path: dir + "/gateway.sqlite", logger: Logger(label: "test")), dir)
    }

    @Test func aCommitRaisesTheHeadBeforeTheObserverHearsOfItAndOpeningsReadNothing() async throws {
        let (store, dir) = try await Self.openStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let channel = try ChannelName(parsing: "topic:bounds")
        #expect(try await store.bounds(of: channel) == (0, 0))
        let readsAfterFirst = store.readerQueries.withLockedValue { $0 }
        // What the observer (the Hub, in the gateway) saw, and what a stream opening at that moment would read.
        let seen = NIOLockedValueBox<(highest: Int64, stale: [String])>((0, []))
        await store.setCommitObserver { messages in
            for message in messages where message.channel == channel {
                let head = store.known.head(of: channel) ?? -1
                seen.withLockedValue { s in
                    s.highest = max(s.highest, message.seq)
                    if head < message.seq { s.stale.append("message \(message.seq) observed while the head read \(head)") }
                }
            }
        }
        let opener = Task {
            var last: Int64 = 0
            var problems: [String] = []
            while !Task.isCancelled {
                let observed = seen.withLockedValue { $0.highest }
                let (head, floor) = try await store.bounds(of: channel)
                if head < observed { problems.append("head \(head) behind a message the observer already had (\(observed))") }
                if head < last { problems.append("head moved back from \(last) to \(head)") }
                if floor != 0 { problems.append("floor \(floor)") }
                last = head
                await Task.yield()
            }
            return problems
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for p in 0..<8 {
                group.addTask {
                    for n in 0..<40 {
                        _ = try await store.append(AppendRequest(channel: channel, sender: "p\(p)", requestId: nil, body: "{\"n\":\(n)}"))
                    }
                }
            }
            try await group.waitForAll()
        }
        opener.cancel()
        let problems = try await opener.value
        #expect(problems.count == 0, "\(problems.prefix(5))")
        let stale = seen.withLockedValue { $0.stale }
        #expect(stale.count == 0, "\(stale.prefix(5))")
        #expect(try await store.bounds(of: channel) == (320, 0))
        #expect(try await store.head(of: channel) == 320)
        #expect(store.readerQueries.withLockedValue { $0 } == readsAfterFirst, "opening a known channel read the store")
        // What memory says is what is stored: a second store on the file reads it.
        let other = try await SQLiteStore.open(path: dir + "/gateway.sqlite", logger: Logger(label: "test"))
        #expect(try await other.bounds(of: channel) == (320, 0))
        await other.close()
        await store.close()
    }

    @Test func aTrimRaisesTheFloorWithoutARead() async throws {
        let (store, dir) = try await Self.openStore()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let channel = try ChannelName(parsing: "topic:trimmed")
        for n in 0..<10 { _ = try await store.append(AppendRequest(channel: channel, sender: "s", requestId: nil, body: "{\"n\":\(n)}")) }
        #expect(try await store.bounds(of: channel) == (10, 0))
        let reads = store.readerQueries.withLockedValue { $0 }
        #expect(try await store.trim(channel, retention: Retention(maxCount: 4), batch: 100) == 6)
        #expect(try await store.bounds(of: channel) == (10, 6))
        #expect(store.readerQueries.withLockedValue { $0 } == reads)
        await store.close()
    }

    /// Updates landing in any order keep the largest head and floor seen; both must be known to answer.
    @Test func racingUpdatesNeverMoveBackwards() throws {
        let known = KnownBounds()
        let a = try ChannelName(parsing: "topic:a"), b = try ChannelName(parsing: "topic:b"), c = try ChannelName(parsing: "topic:c")
        known.committed([(a, Int64(5))])
        #expect(known.bounds(of: a) == nil, "the floor is not known yet")
        #expect(known.head(of: a) == 5)
        known.read(a, head: 3, floor: 0)  // a read that started before the commit
        #expect(known.bounds(of: a)! == (5, 0))
        known.read(a, head: 7, floor: 1)
        #expect(known.bounds(of: a)! == (7, 1))
        known.committed([(a, Int64(6))])
        #expect(known.bounds(of: a)! == (7, 1))
        known.floorRaised(b, to: 4)  // a trim before the channel was read
        #expect(known.bounds(of: b) == nil && known.head(of: b) == nil)
        known.read(b, head: 9, floor: 2)  // a read that started before the trim committed
        #expect(known.bounds(of: b)! == (9, 4))
        known.floorRaised(b, to: 3)
        #expect(known.bounds(of: b)! == (9, 4))
        #expect(known.bounds(of: c) == nil && known.head(of: c) == nil)
    }
}
