import ChatDomain
import Logging
import PostgresNIO
import Testing

/// Appends as a named prepared statement, against a real Postgres through a pool of one connection, so that
/// the test's own queries see that connection's session (`pg_prepared_statements` is per session).
@Suite(.serialized)
struct PreparedAppendTests {
    static let channel = try! ChannelName(parsing: "topic:prepared")

    static func withStore(prepared: Bool, _ body: (PostgresStore, PostgresClient) async throws -> Void) async throws {
        try await withStarted({ try await PostgresServer.start() }, stop: { await $0.stop() }) { postgres in
            let logger = Logger(label: "test-store")
            var configuration = try #require(PostgresStore.configuration(from: postgres.url + "?sslmode=disable"))
            configuration.options.minimumConnections = 1
            configuration.options.maximumConnections = 1
            let client = PostgresClient(configuration: configuration, backgroundLogger: logger)
            let running = Task { await client.run() }
            defer { running.cancel() }
            let store = try await PostgresStore.open(client: client, preparedStatements: prepared, logger: logger)
            try await body(store, client)
            await store.close()
        }
    }

    static func statements(_ client: PostgresClient) async throws -> [String] {
        var names: [String] = []
        for try await name in try await client.query("SELECT name FROM pg_prepared_statements ORDER BY name").decode(String.self) {
            names.append(name)
        }
        return names
    }

    static func publish(_ store: PostgresStore, _ n: Int) async throws -> Int64 {
        try await store.append(AppendRequest(channel: channel, sender: "ops", requestId: "k\(n)", body: #"{"n":\#(n)}"#)).message.seq
    }

    @Test func appendsRunAsThePreparedStatementUnlessSwitchedOff() async throws {
        try await Self.withStore(prepared: true) { store, client in
            let seq1 = try await Self.publish(store, 1)
            #expect(seq1 == 1)
            let seq2 = try await Self.publish(store, 2)
            #expect(seq2 == 2)
            let prepared = try await Self.statements(client)
            #expect(prepared == ["gateway_append_6"])
            #expect(store.preparesAppends)
        }
        try await Self.withStore(prepared: false) { store, client in
            let seq1 = try await Self.publish(store, 1)
            #expect(seq1 == 1)
            let prepared = try await Self.statements(client)
            #expect(prepared == [])
        }
    }

    /// A pooler that moves the session (PgBouncer in transaction mode before 1.21) shows as the statement
    /// missing on the connection an execution reaches: that batch runs again unprepared, nothing is lost or
    /// stored twice, and later batches are not prepared any more.
    @Test func aStatementTheServerLostIsRunUnpreparedFromThenOn() async throws {
        try await Self.withStore(prepared: true) { store, client in
            let seq1 = try await Self.publish(store, 1)
            #expect(seq1 == 1)
            try await client.query("DEALLOCATE gateway_append_6")
            let seq2 = try await Self.publish(store, 2)
            #expect(seq2 == 2)
            #expect(!store.preparesAppends)
            let seq3 = try await Self.publish(store, 3)
            #expect(seq3 == 3)
            let prepared = try await Self.statements(client)
            #expect(prepared == [])
            let page = try await store.messages(in: Self.channel, after: 0, limit: 10)
            #expect(page.messages.map(\.seq) == [1, 2, 3])
            #expect(page.messages.map(\.body) == [#"{"n":1}"#, #"{"n":2}"#, #"{"n":3}"#])
        }
    }
}
