@testable import ChatDomain
import Gateway
import Testing

/// A page read after a cursor, or before one, holds exactly the stored messages in `seq` order, field for
/// field, and says `hasMore` exactly when the store holds more in that direction — also when the page is
/// exactly full. On both stores.
@Suite struct StorePageTests {
    @Test func embeddedPagesAreExactAtEveryBoundary() async throws {
        try await withTestGateway { gateway in try await Self.scenario(gateway.server.app.store) }
    }

    @Test func postgresPagesAreExactAtEveryBoundary() async throws {
        try await withCluster(instances: 1) { cluster in try await Self.scenario(cluster.gateways[0].server.app.store) }
    }

    static func scenario(_ store: any Store) async throws {
        let channel = try ChannelName(parsing: "topic:pages")
        var stored: [Message] = []
        for n in 1...5 {
            let key: String? = n % 2 == 0 ? "key-\(n)" : nil
            stored.append(try await store.append(AppendRequest(channel: channel, sender: "sender-\(n)", requestId: key, body: "{\"n\":\(n)}")).message)
        }
        #expect(stored.map(\.seq) == [1, 2, 3, 4, 5])

        func after(_ seq: Int64, _ limit: Int) async throws -> ([Message], Bool) {
            let page = try await store.messages(in: channel, after: seq, limit: limit)
            return (page.messages, page.hasMore)
        }
        func before(_ seq: Int64, _ limit: Int) async throws -> ([Message], Bool) {
            let page = try await store.messages(in: channel, before: seq, limit: limit)
            return (page.messages, page.hasMore)
        }
        #expect(try await after(0, 5) == (stored, false), "exactly full, nothing after it")
        #expect(try await after(0, 4) == (Array(stored[0..<4]), true))
        #expect(try await after(0, 100) == (stored, false))
        #expect(try await after(2, 2) == (Array(stored[2..<4]), true))
        #expect(try await after(2, 3) == (Array(stored[2..<5]), false))
        #expect(try await after(4, 1) == ([stored[4]], false))
        #expect(try await after(5, 10) == ([], false), "at the head")
        #expect(try await after(0, 1) == ([stored[0]], true))
        #expect(try await before(6, 2) == (Array(stored[3..<5]), true))
        #expect(try await before(3, 2) == (Array(stored[0..<2]), false), "exactly full, nothing before it")
        #expect(try await before(1, 5) == ([], false))
        let empty = try ChannelName(parsing: "topic:pages-empty")
        let none = try await store.messages(in: empty, after: 0, limit: 10)
        #expect(none.messages.isEmpty && !none.hasMore)
    }
}
