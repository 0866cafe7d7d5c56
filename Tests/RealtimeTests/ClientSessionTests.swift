import Auth
@testable import ChatDomain
import Foundation
@testable import Gateway
import NIOCore
import Testing
import Wire

/// `ClientSession` without sockets: commands and outcomes in, actions out.
struct ClientSessionTests {
    static let alice = Actor(sub: "alice", roles: [], sid: "s1", expiresAt: Date(timeIntervalSinceNow: 600))
    static let topic = try! ChannelName(parsing: "topic:news")
    static let thread = try! ChannelName(parsing: "thread:6f1c2b7a-0000-4000-8000-000000000001")

    static func session(_ limits: ClientSession.Limits = .init(), actor: Actor = alice) -> ClientSession {
        var session = ClientSession(actor: actor, limits: limits)
        _ = session.registered(revoked: false)
        return session
    }

    static func message(seq: Int64) -> AppendResult {
        let message = Message(id: "0193a6c4-5a1e-7c3b-9f00-2a6f4e1d9b10", channel: topic, seq: seq, createdAtMicros: 1, sender: "alice", requestId: nil, body: "{}")
        return AppendResult(message: message, replayed: false)
    }

    /// Shutdown with publishes in flight: reading stops, commands read meanwhile are refused, every publish is
    /// acknowledged, and only then the close (1001); without any, the close is at once.
    @Test func shutdownWaitsForThePublishesInFlightAndAcksThem() {
        var session = Self.session()
        _ = session.received(.success(.publish(id: .integer(1), channel: "topic:news", body: .object([:]))))
        _ = session.received(.success(.publish(id: .integer(2), channel: "topic:news", body: .object([:]))))
        #expect(session.shutdown() == [.pauseReading])
        #expect(session.shutdown() == [])
        #expect(session.received(.success(.ping(id: .integer(3)))) == [.fail(.integer(3), ApiError(.shuttingDown, "the server is shutting down"))])
        let first = session.published(.integer(1), .success(Self.message(seq: 1)))
        #expect(first.count == 1 && !first.contains(.close(.shutdown)) && !first.contains(.resumeReading))
        let last = session.published(.integer(2), .failure(ApiError(.storeUnavailable, "down")))
        #expect(last == [.fail(.integer(2), ApiError(.storeUnavailable, "down")), .close(.shutdown)])
        var idle = Self.session()
        #expect(idle.shutdown() == [.close(.shutdown)])
    }

    @Test func registrationSchedulesExpiryOrClosesARevokedSession() {
        var fresh = ClientSession(actor: Self.alice, limits: .init())
        #expect(fresh.registered(revoked: false) == [.scheduleExpiry(Self.alice.expiresAt)])
        var revoked = ClientSession(actor: Self.alice, limits: .init())
        #expect(revoked.registered(revoked: true) == [.close(.revoked)])
        #expect(revoked.received(.success(.ping(id: .integer(1)))) == [])
    }

    @Test func subscribeRegistersFirstAndRepliesOnlyOnceOpened() {
        var session = Self.session()
        let opening = session.received(.success(.subscribe(id: .string("1"), channel: "topic:news", since: nil, history: 5)))
        #expect(opening == [.open(Self.topic, from: .history(5), permission: .subscribe)])
        let opened = session.opened(Self.topic, .success(7))
        #expect(opened == [.reply(.subscribed(id: .string("1"), channel: "topic:news", cursor: Cursor.text(channel: Self.topic, seq: 7))),
                           .begin(Self.topic, after: 7)])
        let again = session.received(.success(.subscribe(id: .string("2"), channel: "topic:news")))
        #expect(again.count == 1)
        if case .fail(.string("2"), let error) = again.first { #expect(error.code == .alreadySubscribed) } else { Issue.record("\(again)") }
    }

    @Test func aRefusedOpenCancelsTheRegistrationAndAnswersTheError() {
        var session = Self.session()
        _ = session.received(.success(.subscribe(id: .integer(3), channel: "topic:news", since: "bad")))
        let refused = session.opened(Self.topic, .failure(ApiError(.invalidCursor, "bad cursor")))
        #expect(refused == [.cancel(Self.topic), .fail(.integer(3), ApiError(.invalidCursor, "bad cursor"))])
        // The channel is free again.
        let retry = session.received(.success(.subscribe(id: .integer(4), channel: "topic:news")))
        #expect(retry == [.open(Self.topic, from: .live, permission: .subscribe)])
    }

    @Test func aBadChannelOrTooManySubscriptionsNeverOpens() {
        var session = Self.session(.init(maxSubscriptions: 1))
        let bad = session.received(.success(.subscribe(id: nil, channel: "room:1")))
        if case .fail(nil, let error) = bad.first { #expect(error.code == .invalidChannel) } else { Issue.record("\(bad)") }
        _ = session.received(.success(.subscribe(id: nil, channel: "topic:news")))
        let second = session.received(.success(.subscribe(id: nil, channel: "topic:other")))
        if case .fail(nil, let error) = second.first { #expect(error.code == .tooManySubscriptions) } else { Issue.record("\(second)") }
    }

    @Test func unsubscribeCancelsAndALateOpenIsIgnored() {
        var session = Self.session()
        _ = session.received(.success(.subscribe(id: nil, channel: "topic:news")))
        let gone = session.received(.success(.unsubscribe(id: .string("u"), channel: "topic:news")))
        #expect(gone == [.cancel(Self.topic), .reply(.unsubscribed(id: .string("u"), channel: "topic:news"))])
        #expect(session.opened(Self.topic, .success(3)) == [])
    }

    @Test func aRemovalDuringTheOpenEndsTheSubscriptionAtTheRemovalsHead() {
        var session = Self.session()
        _ = session.received(.success(.subscribe(id: nil, channel: Self.thread.rawValue)))
        #expect(session.memberRemoved("bob", from: Self.thread, at: 4) == [])  // someone else
        #expect(session.memberRemoved("alice", from: Self.thread, at: 9) == [])
        let opened = session.opened(Self.thread, .success(5))
        #expect(opened.last == .end(Self.thread, after: 9))
        #expect(opened.contains(.begin(Self.thread, after: 5)))
        // Live: a removal ends at once (after its head); the end reached → unsubscribed, forbidden.
        #expect(session.memberRemoved("alice", from: Self.thread, at: 12) == [.end(Self.thread, after: 12)])
        #expect(session.subscriptionEnded(Self.thread, reason: "forbidden") ==
                [.cancel(Self.thread), .reply(.unsubscribed(id: nil, channel: Self.thread.rawValue, reason: "forbidden"))])
        #expect(session.subscriptionCount == 0)
    }

    @Test func revocationClosesOnlyTheSessionsItCovers() {
        var session = Self.session()
        #expect(session.revoked(Revocation(kind: .sid, value: "other", at: 0, until: .max)) == [])
        #expect(session.revoked(Revocation(kind: .sub, value: "alice", at: Int64(Date().timeIntervalSince1970) + 10, until: .max)) == [.close(.revoked)])
        #expect(session.closed)
        #expect(session.received(.success(.ping(id: nil))) == [])
        #expect(session.connectionClosed() == [])
    }

    @Test func closingCancelsEverySubscription() {
        var session = Self.session()
        for name in ["topic:b", "topic:a"] {
            _ = session.received(.success(.subscribe(id: nil, channel: name)))
            _ = session.opened(try! ChannelName(parsing: name), .success(0))
        }
        #expect(session.tokenExpired() == [.close(.tokenExpired)])
        #expect(session.connectionClosed() == [.cancel(try! ChannelName(parsing: "topic:a")), .cancel(try! ChannelName(parsing: "topic:b"))])
    }

    @Test func anExpiryDuringAnOpenClosesOnceTheStreamStarted() {
        var session = Self.session()
        _ = session.open("topic:news", from: .since("c"), permission: .read)
        #expect(session.tokenExpired() == [])
        let opened = session.opened(Self.topic, .success(2))
        #expect(opened.prefix(2) == [.reply(.subscribed(id: nil, channel: "topic:news", cursor: Cursor.text(channel: Self.topic, seq: 2))),
                                     .begin(Self.topic, after: 2)])
        #expect(opened.last == .close(.tokenExpired))
    }

    @Test func publishesInFlightPauseReadingAtTheLimitAndResumeBelowIt() {
        var session = Self.session(.init(maxPublishesInFlight: 2))
        let first = session.received(.success(.publish(id: .integer(1), channel: "topic:news", body: .object([:]))))
        #expect(first == [.publish(.integer(1), channel: "topic:news", requestId: nil, body: .object([:]))])
        let second = session.received(.success(.publish(id: .integer(2), channel: "topic:news", body: .object([:]))))
        #expect(second.first == .pauseReading)
        let acked = session.published(.integer(1), .success(Self.message(seq: 1)))
        #expect(acked == [.resumeReading, .reply(.ack(id: .integer(1), message: RawJSON(Self.message(seq: 1).message.json)))])
        let failed = session.published(.integer(2), .failure(ApiError(.forbidden, "no")))
        #expect(failed == [.fail(.integer(2), ApiError(.forbidden, "no"))])
    }

    @Test func publishesOverTheUserRateCloseAfterTheStrikes() {
        var session = Self.session(.init(rateLimitStrikes: 3))
        let limited = ApiError(.rateLimited, "slow down", retryAfter: 1)
        for i in 0..<2 {
            _ = session.received(.success(.publish(id: .integer(Int64(i)), channel: "topic:news", body: .object([:]))))
            #expect(session.published(.integer(Int64(i)), .failure(limited)) == [.fail(.integer(Int64(i)), limited)])
        }
        _ = session.received(.success(.publish(id: nil, channel: "topic:news", body: .object([:]))))
        #expect(session.published(nil, .failure(limited)) == [.close(.rateLimited)])
    }

    @Test func theCommandRateRefusesThenClosesAndExemptRolesPass() {
        let limits = ClientSession.Limits(commandRate: 1, commandBurst: 2, rateLimitStrikes: 3, exemptRoles: ["service"])
        var session = Self.session(limits)
        let now = NIODeadline.now()
        #expect(session.received(.success(.ping(id: .integer(1))), now: now) == [.reply(.pong(id: .integer(1)))])
        #expect(session.received(.success(.ping(id: .integer(2))), now: now) == [.reply(.pong(id: .integer(2)))])
        for _ in 0..<2 {
            let refused = session.received(.success(.ping(id: .integer(3))), now: now)
            if case .fail(nil, let error) = refused.first { #expect(error.code == .rateLimited) } else { Issue.record("\(refused)") }
        }
        #expect(session.received(.success(.ping(id: .integer(4))), now: now) == [.close(.rateLimited)])

        var service = Self.session(limits, actor: Actor(sub: "svc", roles: ["service"], expiresAt: Date(timeIntervalSinceNow: 60)))
        for i in 0..<10 { #expect(service.received(.success(.ping(id: .integer(Int64(i)))), now: now) == [.reply(.pong(id: .integer(Int64(i))))]) }
    }

    @Test func refreshKeepsTheSubAndReschedulesExpiry() {
        var session = Self.session()
        #expect(session.received(.success(.refresh(id: .integer(5), token: "t"))) == [.verify(.integer(5), token: "t")])
        let later = Actor(sub: "alice", roles: [], expiresAt: Date(timeIntervalSinceNow: 3600))
        #expect(session.verified(.integer(5), .success(later)) == [.scheduleExpiry(later.expiresAt), .reply(.ack(id: .integer(5)))])
        #expect(session.actor == later)
        let mallory = Actor(sub: "mallory", roles: ["admin"], expiresAt: Date(timeIntervalSinceNow: 3600))
        let refused = session.verified(.integer(6), .success(mallory))
        if case .fail(.integer(6), let error) = refused.first { #expect(error.code == .forbidden) } else { Issue.record("\(refused)") }
        #expect(session.actor == later)
    }

    @Test func readIsForThreadsAndBadCommandsAnswerWithTheirId() {
        var session = Self.session()
        #expect(session.received(.success(.read(id: nil, channel: Self.thread.rawValue, cursor: "c"))) ==
                [.markRead(nil, thread: "6f1c2b7a-0000-4000-8000-000000000001", cursor: "c")])
        let topicRead = session.received(.success(.read(id: .integer(1), channel: "topic:news", cursor: "c")))
        if case .fail(.integer(1), let error) = topicRead.first { #expect(error.code == .badRequest) } else { Issue.record("\(topicRead)") }
        let unknown = session.received(ClientCommand.decode("{\"type\":\"dance\",\"id\":\"d\"}"))
        if case .fail(.string("d"), let error) = unknown.first { #expect(error.code == .unknownCommand) } else { Issue.record("\(unknown)") }
        let binary = session.receivedBinary()
        if case .fail(nil, let error) = binary.first { #expect(error.code == .badRequest) } else { Issue.record("\(binary)") }
    }

    @Test func aRefusedSendClosesAsSlowConsumerOnce() {
        var session = Self.session()
        #expect(session.sendRefused() == [.close(.slowConsumer)])
        #expect(session.sendRefused() == [])
        #expect(session.shutdown() == [])
    }

    @Test func repliesEncodeAsTheProtocolSaysAndDecodeBack() throws {
        let message = Self.message(seq: 3).message
        let replies: [ServerReply] = [
            .subscribed(id: .string("1"), channel: "topic:news", cursor: "c1"), .unsubscribed(id: nil, channel: "topic:news", reason: "forbidden"),
            .ack(id: .integer(3), message: RawJSON(message.json), replayed: true), .ack(id: .string("4"), cursor: "c", unread: 2), .pong(id: .number(1.5)),
            .error(id: .string("x\"y"), ServerReply.ServerError(ApiError(.forbidden, "no", details: ["channel": "c"]).envelope(requestId: "r"))),
        ]
        for reply in replies {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(reply.json.utf8)) as? [String: Any])
            #expect(object["type"] is String)
            #expect(try ServerReply.decode(reply.json) == reply, "\(reply.json)")
        }
        #expect(replies[2].json == "{\"type\":\"ack\",\"id\":3,\"message\":\(message.json),\"replayed\":true}")
        #expect(replies[4].json == "{\"type\":\"pong\",\"id\":1.5}")
    }
}
