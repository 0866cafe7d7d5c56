import ChatDomain
import Foundation
import Logging

/// The browser client (`/client.js`, `/client.d.ts`) and the demo page (`/`), read once at start from the
/// resource folder SwiftPM puts next to the executable (`realtime-gateway_Gateway.resources`), or from
/// `GATEWAY_ASSETS_DIR`. Missing files are answered 404 and logged, never a crash.
struct BrowserAssets: Sendable {
    static let bundleName = "realtime-gateway_Gateway.resources"
    let clientJS: String?
    let clientTypes: String?
    let demoPage: String?

    init(directory override: String?, logger: Logger) {
        let directory = override ?? Self.candidates().first { FileManager.default.fileExists(atPath: $0 + "/client.js") }
        func read(_ name: String) -> String? {
            guard let directory else { return nil }
            return try? String(contentsOfFile: directory + "/" + name, encoding: .utf8)
        }
        clientJS = read("client.js")
        clientTypes = read("client.d.ts")
        demoPage = read("demo.html")
        if clientJS == nil { logger.warning("browser client not found: /client.js answers 404 (set GATEWAY_ASSETS_DIR)") }
    }

    /// Beside the executable (a build or an install), then beside the test bundle.
    private static func candidates() -> [String] {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var folders = [URL(fileURLWithPath: executable).deletingLastPathComponent().path]
        if let argument = CommandLine.arguments.first { folders.append(URL(fileURLWithPath: argument).deletingLastPathComponent().path) }
        return folders.map { $0 + "/" + bundleName + "/Resources" }
    }

    static func response(_ text: String?, contentType: String, requestId: String) -> HTTPResponse {
        guard let text else { return .error(ApiError(.notFound, "the browser assets are not installed"), requestId: requestId) }
        var response = HTTPResponse(status: .ok, headers: [("Cache-Control", "no-cache")], body: text)
        response.contentType = contentType
        return response
    }
}
