import NIOConcurrencyHelpers

/// The embedded store's channel heads and floors, kept in memory so that opening a stream (a subscribe, an
/// SSE stream, a long-poll) reads nothing. The store has one writer (the data folder's lock keeps other
/// processes out), so what it commits is the whole truth:
/// - a commit raises its channels' heads before its messages reach the commit observer (and so the Hub): a
///   stream that registered with the Hub and then reads a head here gets every later message live;
/// - a floor is learned from the first read of the channel's row, and raised by a trim once its new floor is
///   committed (in between, a reader may still see the old floor: the read after it checks the floor again in
///   the same snapshot as its rows, as it did when this was a store read);
/// - nothing moves backwards: every update takes the larger value, whatever order racing updates land in.
/// One entry per channel the process has opened or written (as the writer's own heads).
final class KnownBounds: Sendable {
    private struct Entry {
        var head: Int64?
        var floor: Int64?

        mutating func raise(head new: Int64) { head = max(head ?? new, new) }
        mutating func raise(floor new: Int64) { floor = max(floor ?? new, new) }
    }
    private let entries = NIOLockedValueBox<[ChannelName: Entry]>([:])

    /// Head and floor, when both are known.
    func bounds(of channel: ChannelName) -> (head: Int64, floor: Int64)? {
        entries.withLockedValue { entries in
            guard let entry = entries[channel], let head = entry.head, let floor = entry.floor else { return nil }
            return (head, floor)
        }
    }

    /// The head, when known.
    func head(of channel: ChannelName) -> Int64? {
        entries.withLockedValue { $0[channel]?.head ?? nil }
    }

    /// Heads a commit made (called after the commit, before the observer hears of it).
    func committed<Heads: Sequence>(_ heads: Heads) where Heads.Element == (ChannelName, Int64) {
        entries.withLockedValue { entries in
            for (channel, head) in heads { entries[channel, default: Entry()].raise(head: head) }
        }
    }

    /// A channel's row as a read found it.
    func read(_ channel: ChannelName, head: Int64, floor: Int64) {
        entries.withLockedValue { entries in
            entries[channel, default: Entry()].raise(head: head)
            entries[channel, default: Entry()].raise(floor: floor)
        }
    }

    /// A trim committed a new floor (recorded even before the channel's head is known, so that a read that
    /// raced the trim cannot put the older floor back).
    func floorRaised(_ channel: ChannelName, to floor: Int64) {
        entries.withLockedValue { entries in
            entries[channel, default: Entry()].raise(floor: floor)
        }
    }
}
