import Foundation
import NIOConcurrencyHelpers

/// A revoked session (`sid`) or user (`sub`): PROTOCOL.md §3. Revoking a `sub` revokes the tokens issued at
/// or before `at`; revoking a `sid` revokes every token carrying it.
public struct Revocation: Sendable, Equatable, Hashable {
    public enum Kind: String, Sendable { case sid, sub }
    public let kind: Kind
    public let value: String
    /// When it was revoked, in whole seconds since 1970 (`iat` has whole seconds).
    public let at: Int64
    /// When it may be forgotten: no token it covers can still be valid.
    public let until: Int64

    public init(kind: Kind, value: String, at: Int64, until: Int64) {
        self.kind = kind
        self.value = value
        self.at = at
        self.until = until
    }

    /// Whether this revocation covers `actor`'s token.
    public func covers(_ actor: Actor) -> Bool {
        switch kind {
        case .sid: return actor.sid == value
        case .sub:
            guard actor.sub == value else { return false }
            // A token without `iat` cannot show it came later: revoked.
            guard let issued = actor.issuedAt else { return true }
            return Int64(issued.timeIntervalSince1970.rounded(.down)) <= at
        }
    }
}

/// The revocations an instance knows, checked on every authentication. Fed from the store at start, by
/// the bus when another instance revokes, and by a periodic re-read (for what the bus lost).
public final class Revocations: Sendable {
    private struct State {
        var sids: [String: Revocation] = [:]
        var subs: [String: Revocation] = [:]
    }
    private let state = NIOLockedValueBox(State())

    public init() {}

    /// Adds revocations; returns those that were new (the caller closes the connections they cover).
    @discardableResult
    public func apply(_ revocations: [Revocation]) -> [Revocation] {
        state.withLockedValue { state in
            var fresh: [Revocation] = []
            for r in revocations {
                switch r.kind {
                case .sid:
                    if state.sids[r.value] == nil { state.sids[r.value] = r; fresh.append(r) }
                case .sub:
                    if let known = state.subs[r.value], known.at >= r.at { continue }
                    state.subs[r.value] = r
                    fresh.append(r)
                }
            }
            return fresh
        }
    }

    public func isRevoked(_ actor: Actor) -> Bool {
        state.withLockedValue { state in
            if let sid = actor.sid, state.sids[sid] != nil { return true }
            return state.subs[actor.sub]?.covers(actor) ?? false
        }
    }

    /// Forgets revocations past their `until`.
    public func prune(now: Int64) {
        state.withLockedValue { state in
            state.sids = state.sids.filter { $0.value.until > now }
            state.subs = state.subs.filter { $0.value.until > now }
        }
    }
}
