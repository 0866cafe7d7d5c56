import Foundation
import JWTKit
import NIOConcurrencyHelpers

/// The claims the gateway reads (PROTOCOL.md §3): `sub` and `exp` required, `roles`, `sid`, `iat`, `nbf`
/// optional.
struct GatewayClaims: JWTPayload {
    var sub: SubjectClaim
    var exp: ExpirationClaim
    var roles: [String]?
    var sid: String?
    var iat: IssuedAtClaim?
    var nbf: NotBeforeClaim?
    var aud: AudienceClaim?
    var iss: IssuerClaim?

    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// Verifies bearer tokens and mints development tokens. HS256 with a shared secret; RS256 and ES256 with
/// public keys from a JWKS file (reloaded by `reloadKeys()`, which the gateway calls on SIGHUP). The header's
/// `alg` picks the key set: an HS256 token is never checked against a JWKS key (so an HS256 token "signed"
/// with an RSA public key fails), and any other algorithm (`none` included) is refused.
public final class TokenVerifier: Sendable {
    public static let jwksAlgorithms: Set<String> = ["RS256", "ES256"]

    private let hmac: JWTKeyCollection?
    private let jwks: NIOLockedValueBox<JWTKeyCollection?>
    public let jwksFile: String?
    private let leeway: TimeInterval
    private let revocations: Revocations
    /// When set, a token's `aud` (a string or an array) must contain it (`GATEWAY_JWT_AUDIENCE`).
    private let audience: String?
    /// When set, a token's `iss` must equal it (`GATEWAY_JWT_ISSUER`).
    private let issuer: String?
    /// Tokens whose signature and claims were checked: the same token string comes back with every long-poll
    /// and reconnect, and checking it again (two JSON decodes and an HMAC) was a tenth of a long-poll's CPU.
    /// Expiry, not-before and revocation are still checked at every use; emptied when the keys change, and
    /// when it reaches `verifiedCapacity` (bounded).
    private let verified = NIOLockedValueBox<[String: (actor: Actor, notBefore: Date?)]>([:])
    static let verifiedCapacity = 10_000

    /// `secret` must be at least 32 bytes (jwt-kit refuses shorter HMAC keys). `jwksFile` holds the public
    /// keys for RS256 / ES256. Refuses to start without any key.
    public init(hs256Secret secret: String?, jwksFile: String? = nil, leeway: TimeInterval = 30,
                revocations: Revocations = Revocations(), audience: String? = nil, issuer: String? = nil) async throws {
        if let secret {
            let keys = JWTKeyCollection()
            await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
            hmac = keys
        } else {
            hmac = nil
        }
        self.jwksFile = jwksFile
        var loaded: JWTKeyCollection?
        if let jwksFile { loaded = try await Self.loadKeys(jwksFile) }
        self.jwks = NIOLockedValueBox(loaded)
        guard hmac != nil || jwksFile != nil else { throw AuthConfigurationError(description: "no HS256 secret and no JWKS file") }
        self.leeway = leeway
        self.revocations = revocations
        self.audience = audience
        self.issuer = issuer
    }

    /// HS256 only (tests, `gateway token`).
    public convenience init(hs256Secret secret: String, leeway: TimeInterval = 30) async {
        try! await self.init(hs256Secret: Optional(secret), jwksFile: nil, leeway: leeway)
    }

    static func loadKeys(_ path: String) async throws -> JWTKeyCollection {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw AuthConfigurationError(description: "cannot read the JWKS file \(path): \(error)")
        }
        let keys = JWTKeyCollection()
        do { try await keys.add(jwksJSON: text) } catch {
            throw AuthConfigurationError(description: "the JWKS file \(path) is not a valid key set: \(error)")
        }
        return keys
    }

    /// Reads the JWKS file again; on failure the keys in use stay.
    public func reloadKeys() async throws {
        guard let jwksFile else { return }
        let keys = try await Self.loadKeys(jwksFile)
        jwks.withLockedValue { $0 = keys }
        verified.withLockedValue { $0.removeAll() }
    }

    public func verify(_ token: String, now: Date = Date()) async throws(AuthFailure) -> Actor {
        guard !token.isEmpty else { throw .missing }
        if let actor = try verifyKnown(token, now: now) { return actor }
        let keys: JWTKeyCollection
        let header = Self.header(of: token)
        switch header?.alg {
        case nil: throw .malformed
        case "HS256":
            guard let hmac else { throw .unsupportedAlgorithm }
            keys = hmac
        case let alg? where Self.jwksAlgorithms.contains(alg):
            guard let loaded = jwks.withLockedValue({ $0 }) else { throw .unsupportedAlgorithm }
            keys = loaded
        default:
            throw .unsupportedAlgorithm
        }
        let claims: GatewayClaims
        do {
            // Without a `kid`, every key of the set is tried (a JWKS may hold several).
            claims = try await keys.verify(token, as: GatewayClaims.self, iteratingKeys: header?.kid == nil)
        } catch let error as JWTError {
            switch error.errorType {
            case .signatureVerificationFailed: throw .badSignature
            case .unknownKID, .noKeyProvided: throw .badSignature
            default: throw .malformed
            }
        } catch DecodingError.keyNotFound(let key, _) {
            throw .missingClaim(key.stringValue)
        } catch is DecodingError {
            throw .malformed
        } catch {
            // A key that cannot check this algorithm (an ES256 header naming an RSA key) lands here too.
            throw .badSignature
        }
        guard !claims.sub.value.isEmpty else { throw .missingClaim("sub") }
        if claims.exp.value.addingTimeInterval(leeway) <= now { throw .expired }
        if let nbf = claims.nbf, nbf.value > now.addingTimeInterval(leeway) { throw .notYetValid }
        if let audience, !(claims.aud?.value.contains(audience) ?? false) { throw .wrongAudience }
        if let issuer, claims.iss?.value != issuer { throw .wrongIssuer }
        let actor = Actor(sub: claims.sub.value, roles: Set(claims.roles ?? []), sid: claims.sid, expiresAt: claims.exp.value,
                          issuedAt: claims.iat?.value)
        verified.withLockedValue { verified in
            if verified.count >= Self.verifiedCapacity { verified.removeAll() }
            verified[token] = (actor, claims.nbf?.value)
        }
        if revocations.isRevoked(actor) { throw .revoked }
        return actor
    }

    /// `verify` without waiting, for a token verified before (its time window and revocation checked again);
    /// nil when it was not (then `verify`).
    public func verifyKnown(_ token: String, now: Date = Date()) throws(AuthFailure) -> Actor? {
        guard let known = verified.withLockedValue({ $0[token] }) else { return nil }
        return try check(known.actor, notBefore: known.notBefore, now: now)
    }

    /// What is checked again at every use of a token verified before: its time window and revocation.
    private func check(_ actor: Actor, notBefore: Date?, now: Date) throws(AuthFailure) -> Actor {
        if actor.expiresAt.addingTimeInterval(leeway) <= now { throw .expired }
        if let notBefore, notBefore > now.addingTimeInterval(leeway) { throw .notYetValid }
        if revocations.isRevoked(actor) { throw .revoked }
        return actor
    }

    /// The `alg` ("" when absent) and `kid` of a token's header; nil when the header is not base64url JSON.
    static func header(of token: String) -> (alg: String, kid: String?)? {
        guard let dot = token.firstIndex(of: "."), let data = Base64URL.decode(token[..<dot]),
              let header = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
        return (header["alg"] as? String ?? "", header["kid"] as? String)
    }

    /// A signed HS256 token, for `gateway token`, `make run` and tests.
    public func mint(sub: String, roles: [String], ttl: TimeInterval, sid: String? = nil, audience: [String]? = nil, issuer: String? = nil,
                     now: Date = Date()) async throws -> String {
        guard let hmac else { throw AuthConfigurationError(description: "minting needs the HS256 secret") }
        let claims = GatewayClaims(sub: .init(value: sub), exp: .init(value: now.addingTimeInterval(ttl)), roles: roles, sid: sid,
                                   iat: .init(value: now), nbf: nil, aud: audience.map { AudienceClaim(value: $0) },
                                   iss: issuer.map { IssuerClaim(value: $0) })
        return try await hmac.sign(claims)
    }
}

public struct AuthConfigurationError: Error, CustomStringConvertible {
    public let description: String
}

enum Base64URL {
    static func decode(_ text: Substring) -> Data? {
        var base64 = String(text).replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64 += "=" }
        return Data(base64Encoded: base64)
    }
}
