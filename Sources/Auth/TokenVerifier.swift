import Foundation
import JWTKit

/// The claims the gateway reads (PROTOCOL.md §3): `sub` and `exp` required, `roles`, `sid`, `iat`, `nbf`
/// optional.
struct GatewayClaims: JWTPayload {
    var sub: SubjectClaim
    var exp: ExpirationClaim
    var roles: [String]?
    var sid: String?
    var iat: IssuedAtClaim?
    var nbf: NotBeforeClaim?

    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// Verifies bearer tokens and mints development tokens. HS256 with a shared secret for now; RS256 / ES256
/// from a JWKS file come with the Auth issue.
public final class TokenVerifier: Sendable {
    private let keys: JWTKeyCollection
    private let leeway: TimeInterval

    /// `secret` must be at least 32 bytes (jwt-kit refuses shorter HMAC keys).
    public init(hs256Secret secret: String, leeway: TimeInterval = 30) async {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        self.keys = keys
        self.leeway = leeway
    }

    public func verify(_ token: String, now: Date = Date()) async throws(AuthFailure) -> Actor {
        guard !token.isEmpty else { throw .missing }
        let claims: GatewayClaims
        do {
            claims = try await keys.verify(token, as: GatewayClaims.self)
        } catch let error as JWTError {
            switch error.errorType {
            case .signatureVerificationFailed: throw .badSignature
            case .unknownKID, .noKeyProvided: throw .unsupportedAlgorithm
            default: throw .malformed
            }
        } catch {
            throw .malformed
        }
        guard !claims.sub.value.isEmpty else { throw .missingClaim("sub") }
        if claims.exp.value.addingTimeInterval(leeway) <= now { throw .expired }
        if let nbf = claims.nbf, nbf.value > now.addingTimeInterval(leeway) { throw .notYetValid }
        return Actor(sub: claims.sub.value, roles: Set(claims.roles ?? []), sid: claims.sid, expiresAt: claims.exp.value,
                     issuedAt: claims.iat?.value)
    }

    /// A signed token, for `gateway token`, `make run` and tests.
    public func mint(sub: String, roles: [String], ttl: TimeInterval, sid: String? = nil, now: Date = Date()) async throws -> String {
        let claims = GatewayClaims(sub: .init(value: sub), exp: .init(value: now.addingTimeInterval(ttl)), roles: roles, sid: sid,
                                   iat: .init(value: now), nbf: nil)
        return try await keys.sign(claims)
    }
}
