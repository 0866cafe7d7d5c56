import ChatDomain
@testable import Fanout
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

/// The fan-out's batches (issue "Performance"): consecutive messages handed out together are joined into
/// one buffer per format once, a subscriber that takes the whole run writes it at once, and with a write
/// delay the Hub gathers a channel's messages before handing them out. A real Hub, store and bus; no sockets.
@Suite(.serialized) struct HubBatchTests {
    /// Records what the Hub hands it, on its loop.
    final class Recorder: HubSubscriber, @unchecked Sendable {  // `batches` behind a lock
        let eventLoop: any EventLoop
        let format: WireFormat? = .webSocket
        let batches = NIOLockedValueBox<[[Int64]]>([])
        let joined = NIOLockedValueBox<[ByteBuffer?]>([])
        let synced = NIOLockedValueBox<Int64?>(nil)
        init(_ loop: any EventLoop) { eventLoop = loop }
        func hubDelivered(_ batch: EncodedBatch) {
            batches.withLockedValue { $0.append(batch.messages.map(\.seq)) }
            joined.withLockedValue { $0.append(batch.joined(.webSocket)) }
        }
        func hubSynced(upTo seq: Int64) { synced.withLockedValue { $0 = seq } }
    }

    static func frame(_ message: Message, _ format: WireFormat) -> ByteBuffer { ByteBuffer(string: "<\(message.seq)>") }

    /// Three messages published one by one: with a write delay they reach the subscriber as one batch whose
    /// frames are joined; without one, as three. (The three appends take milliseconds; the delay is 3 s.)
    @Test(arguments: [0, 3000])
    func aWriteDelayGathersAChannelsMessagesIntoOneBatch(delayMs: Int64) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("hub-batch-\(UUID().uuidString).sqlite").path
        let store = try await SQLiteStore.open(path: path, logger: Logger(label: "test"))
        let bus = InProcessBus()
        var configuration = Hub.Configuration()
        configuration.writeDelay = .milliseconds(delayMs)
        let hub = Hub(loops: [group.next()], store: store, bus: bus, encoder: Self.frame, configuration: configuration, logger: Logger(label: "test"))
        let channel = try ChannelName(parsing: "topic:batch")
        let recorder = Recorder(group.next())
        hub.subscribe(channel, recorder)
        try await eventually("the Hub knows the channel's head") { recorder.synced.withLockedValue { $0 } == 0 }
        for n in 1...3 {
            let appended = try await store.append(AppendRequest(channel: channel, sender: "t", requestId: nil, body: "{\"n\":\(n)}"))
            bus.publish([appended.message])
        }
        try await eventually("all three handed out") { recorder.batches.withLockedValue { $0.flatMap { $0 } } == [1, 2, 3] }
        let batches = recorder.batches.withLockedValue { $0 }
        let joined = recorder.joined.withLockedValue { $0 }
        if delayMs > 0 {
            #expect(batches == [[1, 2, 3]])
            #expect(joined.first.flatMap { $0.map { String(buffer: $0) } } == "<1><2><3>")
        } else {
            #expect(batches == [[1], [2], [3]])
            #expect(joined.allSatisfy { $0 == nil }, "a batch of one has nothing to join")
        }
        hub.stop()
        await store.close()
        try? FileManager.default.removeItem(atPath: path)
        try await group.shutdownGracefully()
    }

    @Test func onlyConsecutiveBatchesAreJoined() {
        func message(_ seq: Int64) -> EncodedMessage {
            EncodedMessage(Message(id: "m\(seq)", channel: try! ChannelName(parsing: "topic:j"), seq: seq, createdAtMicros: seq, sender: "s",
                                   requestId: nil, body: "{}"), formats: [.webSocket, .serverSentEvents], encoder: Self.frame)
        }
        let run = EncodedBatch([message(4), message(5), message(6)], formats: [.webSocket, .serverSentEvents])
        #expect(run.joined(.webSocket).map { String(buffer: $0) } == "<4><5><6>")
        #expect(run.joined(.serverSentEvents).map { String(buffer: $0) } == "<4><5><6>")
        #expect(run.joined(.webSocketDeflate) == nil, "a format nobody uses is not joined")
        #expect(run.first == 4 && run.last == 6)
        let gap = EncodedBatch([message(4), message(6)], formats: [.webSocket])
        #expect(gap.joined(.webSocket) == nil)
        let one = EncodedBatch([message(4)], formats: [.webSocket])
        #expect(one.joined(.webSocket) == nil)
    }
}
