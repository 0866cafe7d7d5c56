import PostgresNIO

extension PostgresStore {
    /// One append batch as one function call, so one round trip and one implicit transaction (it was five
    /// statements in an explicit transaction: seven round trips with BEGIN and COMMIT, and the channels' rows
    /// stayed locked across all of them, so other instances' batches queued behind). Migrations 6 and 7 both
    /// run this text: 6 once made it without the membership check (`p_member`); 7 adds this signature beside
    /// that one, which an instance not yet upgraded keeps calling. Migration 8 runs it again: since then a batch
    /// without request ids skips the two idempotency statements and the count.
    ///
    /// Arguments: per request (1-based, in batch order) its channel, sender, request id (`''` for none),
    /// canonical body and whether the sender must be a member of the thread; the oldest `created_at` a request
    /// id is remembered from. One row per request:
    /// - `f`: refused: the sender is not a member of the thread (checked first, after locking the sender's
    ///   membership row: a removal deletes that row, so it either committed before this read or waits for this
    ///   commit, and then takes the channel's head after this batch's messages);
    /// - `n`: stored now, with its seq, id (UUIDv7 of its `created_at`), `created_at` and membership epoch;
    /// - `r`: the request id was used within the window: the original's seq, id, `created_at` and body;
    /// - `x`: the request id's message was removed by the retention (`o_seq` is its seq);
    /// - `d`: the request id came earlier in this batch (`o_seq` is that request's index).
    /// Heads are taken in channel-name order, so concurrent batches never deadlock. A request id taken by
    /// another transaction meanwhile raises `GW409`: the statement rolls back and the caller runs it again.
    static let appendFunction = """
        CREATE OR REPLACE FUNCTION gateway_append(p_channel text[], p_sender text[], p_request text[], p_body text[], p_member boolean[],
                                                  p_cutoff bigint)
        RETURNS TABLE (o_index int, o_kind text, o_seq bigint, o_id text, o_created_at bigint, o_body text, o_epoch bigint)
        LANGUAGE plpgsql AS $fn$
        DECLARE
            n int := coalesce(cardinality(p_channel), 0);
            kind text[] := array_fill('n'::text, ARRAY[n]);
            keyed bigint := 0;
            r record;
        BEGIN
            -- 0. Members' publishes to threads: the membership rows locked (a removal's DELETE waits for this
            --    commit, or this waits for the removal's), then read in a statement of their own (its snapshot
            --    sees a removal committed meanwhile). A sender who is not a member is refused.
            --    A batch without such a publish (topics only) skips both statements.
            IF true = ANY(p_member) THEN
                PERFORM 1 FROM unnest(p_channel, p_sender, p_member) AS x(c, s, m)
                    JOIN thread_members t ON t.thread_id = substr(x.c, 8) AND t.user_id = x.s
                    WHERE x.m FOR KEY SHARE OF t;
                FOR r IN
                    SELECT x.i::int AS i FROM unnest(p_channel, p_sender, p_member) WITH ORDINALITY AS x(c, s, m, i)
                    WHERE x.m AND NOT EXISTS (SELECT 1 FROM thread_members t WHERE t.thread_id = substr(x.c, 8) AND t.user_id = x.s)
                LOOP
                    kind[r.i] := 'f';
                    o_index := r.i; o_kind := 'f'; o_seq := 0; o_id := NULL; o_created_at := NULL; o_body := NULL; o_epoch := 0;
                    RETURN NEXT;
                END LOOP;
            END IF;
            -- 1, 2: only for a batch with request ids (most publishes to topics carry none: three statements
            --    fewer per batch).
            IF '' <> ANY(p_request) THEN
                -- 1. Request ids seen before, within the window.
                FOR r IN
                    SELECT x.i::int AS i, k.seq, m.id::text AS mid, m.created_at, m.body
                    FROM unnest(p_channel, p_sender, p_request) WITH ORDINALITY AS x(c, s, q, i)
                    JOIN idempotency k ON k.channel = x.c AND k.sender = x.s AND k.request_id = x.q AND k.created_at >= p_cutoff
                    LEFT JOIN messages m ON m.channel = k.channel AND m.seq = k.seq
                    WHERE x.q <> '' AND kind[x.i] = 'n'
                LOOP
                    kind[r.i] := CASE WHEN r.mid IS NULL THEN 'x' ELSE 'r' END;
                    o_index := r.i; o_kind := kind[r.i]; o_seq := r.seq; o_id := r.mid; o_created_at := r.created_at; o_body := r.body; o_epoch := 0;
                    RETURN NEXT;
                END LOOP;
                -- 2. A request id twice in this batch: the first is stored, the later ones replay it (a refused
                --    sender's repeats are refused too: same channel, same sender).
                FOR r IN
                    SELECT y.i, y.first FROM (
                        SELECT x.i::int AS i, (min(x.i) OVER (PARTITION BY x.c, x.s, x.q))::int AS first
                        FROM unnest(p_channel, p_sender, p_request) WITH ORDINALITY AS x(c, s, q, i) WHERE x.q <> '') y
                    WHERE y.i <> y.first
                LOOP
                    IF kind[r.i] = 'n' THEN
                        kind[r.i] := 'd';
                        o_index := r.i; o_kind := 'd'; o_seq := r.first; o_id := NULL; o_created_at := NULL; o_body := NULL; o_epoch := 0;
                        RETURN NEXT;
                    END IF;
                END LOOP;
                SELECT count(*) INTO keyed FROM unnest(p_request) WITH ORDINALITY AS x(q, i) WHERE x.q <> '' AND kind[x.i] = 'n';
            END IF;
            -- 3. Each channel's head moves by its count (rows locked in name order), then the messages and the keys.
            FOR r IN
                WITH fresh AS (
                    SELECT x.c, x.i::int AS i, row_number() OVER (PARTITION BY x.c ORDER BY x.i) AS o, count(*) OVER (PARTITION BY x.c) AS k
                    FROM unnest(p_channel) WITH ORDINALITY AS x(c, i) WHERE kind[x.i] = 'n'),
                heads AS (
                    INSERT INTO channels AS ch (name, last_seq, last_created_at)
                    SELECT f.c, f.k, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint + f.k - 1 FROM fresh f WHERE f.o = 1 ORDER BY f.c
                    ON CONFLICT (name) DO UPDATE SET
                        last_seq = ch.last_seq + excluded.last_seq,
                        last_created_at = greatest(excluded.last_created_at, ch.last_created_at + excluded.last_seq)
                    RETURNING ch.name, ch.last_seq, ch.last_created_at, ch.member_epoch),
                numbered AS MATERIALIZED (
                    SELECT f.i, f.c, h.last_seq - f.k + f.o AS seq, h.last_created_at - f.k + f.o AS created_at, h.member_epoch AS epoch
                    FROM fresh f JOIN heads h ON h.name = f.c),
                made AS MATERIALIZED (
                    -- UUIDv7: 48 bits of Unix milliseconds over a random v4 UUID, version bits 0100 -> 0111.
                    SELECT w.*, encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                        PLACING substring(int8send(w.created_at / 1000) FROM 3) FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid AS id
                    FROM numbered w),
                stored AS (
                    INSERT INTO messages (channel, seq, id, created_at, sender, request_id, body, member_epoch)
                    SELECT w.c, w.seq, w.id, w.created_at, p_sender[w.i], NULLIF(p_request[w.i], ''), p_body[w.i], w.epoch FROM made w),
                keys AS (
                    INSERT INTO idempotency AS k (channel, sender, request_id, seq, created_at)
                    SELECT w.c, p_sender[w.i], p_request[w.i], w.seq, w.created_at FROM made w WHERE p_request[w.i] <> ''
                    ON CONFLICT (channel, sender, request_id) DO UPDATE SET seq = excluded.seq, created_at = excluded.created_at
                    WHERE k.created_at < p_cutoff
                    RETURNING 1)
                SELECT w.i, w.seq, w.id::text AS id, w.created_at, w.epoch, (SELECT count(*) FROM keys) AS taken FROM made w
            LOOP
                IF r.taken <> keyed THEN
                    RAISE EXCEPTION 'a request id was taken by another transaction meanwhile' USING ERRCODE = 'GW409';
                END IF;
                o_index := r.i; o_kind := 'n'; o_seq := r.seq; o_id := r.id; o_created_at := r.created_at; o_body := NULL; o_epoch := r.epoch;
                RETURN NEXT;
            END LOOP;
        END
        $fn$
        """
}

/// One append batch: `gateway_append`'s arguments, and its rows (index, kind, seq, id, created_at, body, epoch).
/// Run as a named prepared statement, the server parses and plans the call once per connection instead of per
/// batch: 3 instances at 2,000 publishes/s, Postgres CPU per batch 0.38–0.55 → 0.30–0.34 ms (three alternating pairs).
struct AppendStatement: PostgresPreparedStatement {
    /// Named after the function's signature: a later signature gets a statement of its own.
    static let name = "gateway_append_6"
    static let sql = """
        SELECT o_index, o_kind, o_seq, o_id, o_created_at, o_body, o_epoch
        FROM gateway_append($1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[], $6::bigint)
        """
    typealias Row = (Int, String, Int64, String?, Int64?, String?, Int64)

    let batch: [AppendRequest]
    /// The oldest `created_at` a request id is remembered from.
    let cutoff: Int64

    func makeBindings() throws -> PostgresBindings {
        var bindings = PostgresBindings(capacity: 6)
        bindings.append(batch.map(\.channel.rawValue))
        bindings.append(batch.map(\.sender))
        bindings.append(batch.map { $0.requestId ?? "" })
        bindings.append(batch.map(\.body))
        bindings.append(batch.map(\.senderMustBeMember))
        bindings.append(cutoff)
        return bindings
    }

    func decodeRow(_ row: PostgresRow) throws -> Row { try row.decode(Row.self) }
}
