import Auth
import ChatDomain
import Fanout
import NIOCore

/// `GET /v1/channels/{channel}/poll`: answers at once when messages after `since` exist, otherwise waits
/// (registered with the Hub) until one is committed, the timeout passes, or the token expires. The answer
/// is always read from the store, so it is the same on every instance.
final class LongPoll: HubSubscriber, ConnectionBoundStream, LiveStream, @unchecked Sendable {  // state only touched on `eventLoop`
    struct Start: Sendable {
        let channel: ChannelName
        let after: Int64
        let limit: Int
        let timeout: TimeAmount
        let requestId: String
        let actor: Actor
    }

    static func prepare(_ app: GatewayApp, _ request: HTTPRequest, channel name: String) async throws(ApiError) -> Start {
        let actor = try await app.authenticate(request.bearerToken)
        let channel = try await app.channels.authorize(actor, .read, name)
        let limit = try request.intParameter("limit", default: 100, range: 1...ChannelService.maxPageSize)
        let timeout = try request.intParameter("timeout", default: 25, range: 0...60)
        let cursor = try request.query["since"].map { (text) throws(ApiError) in try Cursor(parsing: text, for: channel) }
        let head = try await app.store.head(of: channel)
        let after = try app.channels.position(of: cursor, in: channel, head: head)
        let untilExpiry = Int64(actor.expiresAt.timeIntervalSinceNow * 1000)
        return Start(channel: channel, after: after, limit: limit, timeout: .milliseconds(max(0, min(Int64(timeout) * 1000, untilExpiry))),
                     requestId: request.requestId, actor: actor)
    }

    let eventLoop: any EventLoop
    let format: WireFormat? = nil
    private let app: GatewayApp
    private let start: Start
    private let complete: (HTTPResponse) -> Void
    private var finished = false
    private var reading = false
    private var arrivedWhileReading = false
    /// The timeout passed while a read was in flight: that read still answers (with what it found).
    private var timedOut = false
    private var timer: Scheduled<Void>?

    init(app: GatewayApp, start: Start, eventLoop: any EventLoop, complete: @escaping (HTTPResponse) -> Void) {
        self.app = app
        self.start = start
        self.eventLoop = eventLoop
        self.complete = complete
    }

    func run() {
        app.hub.subscribe(start.channel, self)
        app.streams.add(self)
        // A revocation between the token check and the registration did not find this poll.
        if app.revocations.isRevoked(start.actor) {
            return finish(.error(ApiError(.tokenRevoked, AuthFailure.revoked.reason), requestId: start.requestId))
        }
        timer = eventLoop.scheduleTask(in: start.timeout) { [weak self] in self?.answerEmpty() }
        read()
    }

    func hubDelivered(_ messages: [EncodedMessage]) {
        guard !finished else { return }
        if reading { arrivedWhileReading = true } else { read() }
    }

    func hubSynced(upTo seq: Int64) {
        if seq > start.after { hubDelivered([]) }
    }

    private func read() {
        reading = true
        let store = app.store
        let channels = app.channels
        let start = self.start
        Task {
            let result: Result<Page, ApiError>
            do throws(ApiError) {
                let page = try await channels.page(in: start.channel, after: start.after, limit: start.limit)
                // A member removed while the poll waited gets nothing published after the removal.
                if case .thread(let id) = start.channel.kind, !page.messages.isEmpty, !start.actor.isAdmin,
                   try await !store.isMember(start.actor.sub, of: id) {
                    throw ApiError(.forbidden, "no longer a member of this thread")
                }
                result = .success(page)
            } catch {
                result = .failure(error)
            }
            self.eventLoop.execute {
                self.reading = false
                guard !self.finished else { return }
                switch result {
                case .failure(let error):
                    self.finish(.error(error, requestId: start.requestId))
                case .success(let page) where !page.messages.isEmpty:
                    self.finish(.json(.ok, Routes.pageJSON(page.messages, cursor: page.messages.last!.cursor, hasMore: page.hasMore)))
                case .success:
                    if self.timedOut {
                        self.answerEmpty()
                    } else if self.arrivedWhileReading {
                        self.arrivedWhileReading = false
                        self.read()
                    }
                }
            }
        }
    }

    private func answerEmpty() {
        guard !finished else { return }
        // Messages after `since` may be on their way from the store (a timeout of 0 included): let the read answer.
        if reading && !timedOut {
            timedOut = true
            return
        }
        finish(.json(.ok, Routes.pageJSON([], cursor: Cursor.text(channel: start.channel, seq: start.after), hasMore: false)))
    }

    private func finish(_ response: HTTPResponse) {
        end()
        complete(response)
    }

    private func end() {
        finished = true
        timer?.cancel()
        app.hub.unsubscribe(start.channel, self)
        app.streams.remove(self)
    }

    func connectionClosed() {
        guard !finished else { return }
        end()
    }

    func shutdown() {
        eventLoop.execute { self.answerEmpty() }
    }

    func revoke(_ revocation: Revocation) {
        guard revocation.covers(start.actor) else { return }
        eventLoop.execute {
            guard !self.finished else { return }
            self.finish(.error(ApiError(.tokenRevoked, AuthFailure.revoked.reason), requestId: self.start.requestId))
        }
    }

    func memberRemoved(_ user: String, from channel: ChannelName, at head: Int64) {
        guard user == start.actor.sub, channel == start.channel else { return }
        eventLoop.execute {
            guard !self.finished else { return }
            self.finish(.error(ApiError(.forbidden, "no longer a member of this thread"), requestId: self.start.requestId))
        }
    }
}
