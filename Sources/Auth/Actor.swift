import Foundation

/// Who is asking: the verified claims of a bearer token.
public struct Actor: Sendable, Equatable {
    public let sub: String
    public let roles: Set<String>
    public let sid: String?
    public let expiresAt: Date
    public let issuedAt: Date?

    public init(sub: String, roles: Set<String>, sid: String? = nil, expiresAt: Date, issuedAt: Date? = nil) {
        self.sub = sub
        self.roles = roles
        self.sid = sid
        self.expiresAt = expiresAt
        self.issuedAt = issuedAt
    }

    public var isAdmin: Bool { roles.contains("admin") }
}

/// Why a token was refused. The gateway answers every case with `401 UNAUTHENTICATED`.
public enum AuthFailure: Error, Sendable, Equatable {
    case missing
    case malformed
    case badSignature
    case expired
    case notYetValid
    case missingClaim(String)
    case unsupportedAlgorithm
    case revoked
    /// `aud` does not name this gateway's audience (when one is configured).
    case wrongAudience
    /// `iss` is not the configured issuer.
    case wrongIssuer

    public var reason: String {
        switch self {
        case .missing: "no bearer token"
        case .malformed: "the token is malformed"
        case .badSignature: "the token's signature does not verify"
        case .expired: "the token has expired"
        case .notYetValid: "the token is not valid yet"
        case .missingClaim(let c): "the token has no \(c) claim"
        case .unsupportedAlgorithm: "the token's algorithm is not accepted"
        case .revoked: "the token was revoked"
        case .wrongAudience: "the token is not meant for this audience"
        case .wrongIssuer: "the token's issuer is not accepted"
        }
    }
}
