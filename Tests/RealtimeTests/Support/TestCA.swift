import Foundation
import NIOSSL

/// A certificate authority made by the suite with `openssl` (P-256 keys, valid for two days), and the server
/// certificates it signs: for TLS tests of the listener, Postgres and Redis.
struct TestCA: Sendable {
    let dir: String
    var certificateFile: String { dir + "/ca.pem" }

    static func make() async throws -> TestCA {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("gw-ca-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                           "-keyout", dir + "/ca.key", "-out", dir + "/ca.pem", "-days", "2", "-subj", "/CN=gateway test CA",
                           "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        return TestCA(dir: dir)
    }

    /// A server certificate for `localhost` and 127.0.0.1 signed by this CA: (certificate file, key file).
    func issue(_ name: String) async throws -> (certificate: String, key: String) {
        let base = dir + "/" + name
        try await Self.openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                                "-keyout", base + ".key", "-out", base + ".csr", "-subj", "/CN=localhost"])
        try "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            .write(toFile: base + ".ext", atomically: true, encoding: .utf8)
        try await Self.openssl(["x509", "-req", "-in", base + ".csr", "-CA", certificateFile, "-CAkey", dir + "/ca.key", "-CAcreateserial",
                                "-out", base + ".pem", "-days", "2", "-extfile", base + ".ext"])
        return (base + ".pem", base + ".key")
    }

    /// A client context that trusts this CA only.
    func clientContext() throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .file(certificateFile)
        return try NIOSSLContext(configuration: configuration)
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: dir)
    }

    private static func openssl(_ arguments: [String]) async throws {
        let (status, output) = try await TestServices.run("/usr/bin/openssl", arguments)
        guard status == 0 else { throw ServiceError(description: "openssl \(arguments.first ?? "") failed: \(output)") }
    }
}
