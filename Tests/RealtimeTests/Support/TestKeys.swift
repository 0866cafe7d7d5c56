import Foundation
import JWTKit

/// Claims as any issuer might write them (every field optional, to build bad tokens too).
struct TestClaims: JWTPayload {
    var sub: SubjectClaim?
    var exp: ExpirationClaim?
    var roles: [String]?
    var sid: String?
    var iat: IssuedAtClaim?
    var nbf: NotBeforeClaim?

    init(sub: String? = "alice", ttl: TimeInterval = 3600, roles: [String] = ["admin"], sid: String? = nil, notBefore: Date? = nil, issued: Date = Date()) {
        self.sub = sub.map { SubjectClaim(value: $0) }
        self.exp = ExpirationClaim(value: Date().addingTimeInterval(ttl))
        self.roles = roles
        self.sid = sid
        self.iat = IssuedAtClaim(value: issued)
        self.nbf = notBefore.map { NotBeforeClaim(value: $0) }
    }

    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// An RSA key (made by openssl) and a P-256 key, their public halves in a JWKS file, and signers for each.
struct TestKeys: Sendable {
    let jwksFile: String
    let rsa: JWTKeyCollection
    let ec: JWTKeyCollection
    /// HS256 with the RSA public key's PEM as the secret, under the RSA key's kid: the classic confusion attack.
    let confused: JWTKeyCollection
    let otherRSA: JWTKeyCollection

    static func make() async throws -> TestKeys {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-keys-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        func rsaKey(_ name: String) async throws -> Insecure.RSA.PrivateKey {
            let (status, output) = try await TestServices.run("/usr/bin/openssl", ["genrsa", "-out", dir + "/\(name).pem", "2048"])
            guard status == 0 else { throw ServiceError(description: "openssl genrsa failed: \(output)") }
            return try Insecure.RSA.PrivateKey(pem: try String(contentsOfFile: dir + "/\(name).pem", encoding: .utf8))
        }
        let rsaPrivate = try await rsaKey("rsa")
        let otherPrivate = try await rsaKey("other")
        let ecPrivate = ES256PrivateKey()
        let (modulus, exponent) = try rsaPrivate.publicKey.getKeyPrimitives()
        let (x, y) = ecPrivate.publicKey.parameters!
        let jwks = """
            {"keys":[
              {"kty":"RSA","kid":"rsa-1","alg":"RS256","use":"sig","n":"\(modulus.base64URL)","e":"\(exponent.base64URL)"},
              {"kty":"EC","kid":"ec-1","alg":"ES256","use":"sig","crv":"P-256","x":"\(x)","y":"\(y)"}
            ]}
            """
        let jwksFile = dir + "/jwks.json"
        try jwks.write(toFile: jwksFile, atomically: true, encoding: .utf8)
        let rsa = JWTKeyCollection()
        await rsa.add(rsa: rsaPrivate, digestAlgorithm: .sha256, kid: "rsa-1")
        let ec = JWTKeyCollection()
        await ec.add(ecdsa: ecPrivate, kid: "ec-1")
        let confused = JWTKeyCollection()
        await confused.add(hmac: HMACKey(from: rsaPrivate.publicKey.pemRepresentation), digestAlgorithm: .sha256, kid: "rsa-1")
        let otherRSA = JWTKeyCollection()
        await otherRSA.add(rsa: otherPrivate, digestAlgorithm: .sha256, kid: "rsa-1")
        return TestKeys(jwksFile: jwksFile, rsa: rsa, ec: ec, confused: confused, otherRSA: otherRSA)
    }

    static func unsigned(_ claims: TestClaims) throws -> String {
        let payload = try JSONEncoder().encode(claims)
        return Data("{\"alg\":\"none\",\"typ\":\"JWT\"}".utf8).base64URL + "." + payload.base64URL + "."
    }
}

extension Data {
    var base64URL: String {
        base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}
