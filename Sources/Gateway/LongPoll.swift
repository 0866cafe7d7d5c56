import Auth
import ChatDomain
import Fanout
import NIOConcurrencyHelpers
import NIOCore
import Wire

/// `GET /v1/channels/{channel}/poll`, a thin transport of a `ClientSession` with one read: answers at once
/// when messages after `since` exist, otherwise waits (registered with the Hub) until one is committed, the
/// timeout passes, or the token expires. A poll that finds messages answers with a store read, so it is the
/// same on every instance; polls waiting at the same position share one read (`SharedPageReads`). A waiting
/// poll woken by the Hub with the very next messages answers with those (the same ones, committed, in order)
/// without reading, and a poll at the channel's head does not read before it waits.
final class LongPoll: HubSubscriber, SessionTransport, ConnectionBoundStream, @unchecked Sendable {  // state only touched on `eventLoop`
    struct Parameters: Sendable {
        let start: ChannelService.StreamStart
        let limit: Int
        let timeout: TimeAmount

        init(_ request: HTTPRequest) throws(ApiError) {
            limit = try request.intParameter("limit", default: 100, range: 1...ChannelService.maxPageSize)
            timeout = .seconds(Int64(try request.intParameter("timeout", default: 25, range: 0...60)))
            start = request.query["since"].map { .since($0) } ?? .live
        }
    }

    let eventLoop: any EventLoop
    let format: WireFormat? = nil
    private let app: GatewayApp
    private let parameters: Parameters
    private var requestId: String { driver.log.requestId }
    private var driver: SessionDriver!
    private let complete: (HTTPResponse) -> Void
    private var channel: ChannelName?
    private var after: Int64 = 0
    private var waiting = false
    /// When this poll registered with the Hub: a store read started since then sees every message the Hub
    /// could not tell it about.
    private var registeredAt = NIODeadline.now()
    private var finished = false
    private var reading = false
    private var arrivedWhileReading = false
    /// The timeout passed while a read was in flight: that read still answers (with what it found).
    private var timedOut = false
    private var timer: Scheduled<Void>?

    init(app: GatewayApp, actor: Actor, parameters: Parameters, request: HTTPRequest, eventLoop: any EventLoop, complete: @escaping (HTTPResponse) -> Void) {
        self.app = app
        self.parameters = parameters
        self.eventLoop = eventLoop
        self.complete = complete
        self.driver = SessionDriver(app: app, actor: actor, kind: .longPoll, eventLoop: eventLoop, log: request.log, transport: self)
    }

    func run(channel name: String) {
        driver.start()
        driver.open(name, from: parameters.start, permission: .read)
    }

    // MARK: SessionTransport

    func deliver(_ reply: ServerReply) {}

    func fail(_ id: CommandID?, _ error: ApiError) { finish(.error(error, requestId: requestId)) }

    func register(_ channel: ChannelName) {
        self.channel = channel
        registeredAt = .now()
        app.hub.subscribe(channel, self)
    }

    func begin(_ channel: ChannelName, after: Int64, head: Int64?, membershipEpoch: Int64?) {
        guard !finished else { return }
        self.after = after
        waiting = true
        timer = eventLoop.scheduleTask(in: parameters.timeout) { [weak self] in self?.answerEmpty() }
        // Nothing after `since` when the opening read the channel's head, which it did after this poll registered
        // with the Hub: whatever comes later reaches the poll from the Hub. No read needed.
        if head == after { return }
        // Polls arriving together at one position (each answer sends its poller back at once) share a read.
        read(joiningReadsFrom: registeredAt)
    }

    func cancel(_ channel: ChannelName) {
        app.hub.unsubscribe(channel, self)
        self.channel = nil
    }

    /// A member removed while the poll waited gets nothing published after the removal.
    func end(_ channel: ChannelName, after: Int64) {
        finish(.error(ApiError(.forbidden, "no longer a member of this thread"), requestId: requestId))
    }

    func close(_ reason: ClientSession.Close) {
        switch reason {
        case .revoked: finish(.error(ApiError(.tokenRevoked, AuthFailure.revoked.reason), requestId: requestId))
        case _ where waiting: answerEmpty()
        case .tokenExpired: finish(.error(ApiError(.unauthenticated, AuthFailure.expired.reason), requestId: requestId))
        default: finish(.error(ApiError(.shuttingDown, "the server is shutting down"), requestId: requestId))
        }
    }

    func setReading(_ on: Bool) {}

    // MARK: HubSubscriber

    /// The Hub hands over committed messages in `seq` order without gaps: when they continue right after
    /// `after`, they are the answer (the same messages a store read would find), and no read is needed.
    func hubDelivered(_ batch: EncodedBatch) {
        guard !finished, waiting, !reading, let channel else { return somethingArrived() }
        var messages: [Message] = []
        var bytes = 0
        var hasMore = false
        for encoded in batch.messages where encoded.seq > after {
            guard encoded.seq == after + 1 + Int64(messages.count) else { return somethingArrived() }  // not next: the store knows
            let size = encoded.message.json.utf8.count
            // The page rule of a store read: `limit` messages, about `GATEWAY_PAGE_BYTES`.
            guard app.channels.pageTakes(count: messages.count, bytes: bytes, size: size, limit: parameters.limit) else {
                hasMore = true
                break
            }
            messages.append(encoded.message)
            bytes += size
        }
        guard !messages.isEmpty else { return }  // nothing after this poll's position
        let page = Page(messages: messages, hasMore: hasMore)
        // A topic's permission comes from the config alone; a thread's membership is checked again, as after a read.
        guard case .thread = channel.kind else { return answer(.success(page)) }
        answer(in: channel) { page }
    }

    func hubSynced(upTo seq: Int64) {
        if seq > after { somethingArrived() }
    }

    private func somethingArrived() {
        // Before `begin` a notification needs nothing: the first read starts after it.
        guard !finished, waiting else { return }
        if reading { arrivedWhileReading = true } else { read(joiningReadsFrom: .now()) }
    }

    /// Reads the page after `after`, or joins a read in flight for the same position that started at or after
    /// `from` (this poll's registration, or the notification that woke it): such a read sees every message
    /// committed before then, and anything later wakes this poll again.
    private func read(joiningReadsFrom from: NIODeadline) {
        guard let channel else { return }
        arrivedWhileReading = false
        let (app, after, limit) = (self.app, self.after, parameters.limit)
        answer(in: channel) { () async throws(ApiError) in
            try await app.pageReads.page(in: channel, after: after, limit: limit, joiningReadsFrom: from)
        }
    }

    /// Finds the page off the loop (a read, or the Hub's messages), checks the permission again when it holds
    /// messages (a removal the bus lost: nothing published after it is answered), then answers on the loop.
    private func answer(in channel: ChannelName, with page: @escaping @Sendable () async throws(ApiError) -> Page) {
        reading = true
        let (app, actor) = (self.app, driver.actor)
        Task {
            let result: Result<Page, ApiError>
            do throws(ApiError) {
                let found = try await page()
                if !found.messages.isEmpty { _ = try await app.channels.authorize(actor, .read, channel.rawValue) }
                result = .success(found)
            } catch {
                result = .failure(error)
            }
            self.eventLoop.execute { self.answer(result) }
        }
    }

    private func answer(_ result: Result<Page, ApiError>) {
        reading = false
        guard !finished else { return }
        switch result {
        case .failure(let error):
            finish(.error(error, requestId: requestId))
        case .success(let page) where !page.messages.isEmpty:
            app.metrics.polledMessages.increment(by: page.messages.count)
            finish(Routes.page(page.messages, cursor: page.messages.last!.cursor, hasMore: page.hasMore))
        case .success:
            if timedOut {
                answerEmpty()
            } else if arrivedWhileReading {
                read(joiningReadsFrom: .now())
            }
        }
    }

    private func answerEmpty() {
        guard !finished else { return }
        guard let channel, waiting else { return }
        // Messages after `since` may be on their way from the store (a timeout of 0 included): let the read answer.
        if reading && !timedOut {
            timedOut = true
            return
        }
        finish(Routes.page([], cursor: Cursor.text(channel: channel, seq: after), hasMore: false))
    }

    private func finish(_ response: HTTPResponse) {
        guard !finished else { return }
        stop()
        complete(response)
    }

    private func stop() {
        finished = true
        timer?.cancel()
        driver.connectionClosed()
    }

    func connectionClosed() {
        guard !finished else { return }
        stop()
    }
}

/// Long-polls waiting at the same position of a channel share one store read: a message committed wakes
/// every waiting poll, and they ask for the same page.
final class SharedPageReads: Sendable {
    private struct Key: Hashable {
        let channel: ChannelName
        let after: Int64
        let limit: Int
    }
    private struct Read {
        let id: UInt64
        let startedAt: NIODeadline
        let task: Task<Result<Page, ApiError>, Never>
    }
    private struct State {
        var next: UInt64 = 0
        var inFlight: [Key: Read] = [:]
    }
    private let state = NIOLockedValueBox(State())
    private let channels: ChannelService
    private let metrics: GatewayMetrics

    init(channels: ChannelService, metrics: GatewayMetrics) {
        self.channels = channels
        self.metrics = metrics
    }

    /// The page after `after`: the answer of a read already in flight for the same page will do if it started at
    /// or after `from` (it sees every message committed before then).
    func page(in channel: ChannelName, after: Int64, limit: Int, joiningReadsFrom from: NIODeadline) async throws(ApiError) -> Page {
        let key = Key(channel: channel, after: after, limit: limit)
        let channels = self.channels
        let (read, joined) = state.withLockedValue { state -> (Read, Bool) in
            if let read = state.inFlight[key], read.startedAt >= from { return (read, true) }
            state.next += 1
            let task = Task { () -> Result<Page, ApiError> in
                do throws(ApiError) { return .success(try await channels.page(in: channel, after: after, limit: limit)) } catch { return .failure(error) }
            }
            let read = Read(id: state.next, startedAt: .now(), task: task)
            state.inFlight[key] = read
            return (read, false)
        }
        metrics.count(joined ? .pollReadsJoined : .pollReadsStarted)
        let result = await read.task.value
        state.withLockedValue { if $0.inFlight[key]?.id == read.id { $0.inFlight[key] = nil } }
        return try result.get()
    }
}
