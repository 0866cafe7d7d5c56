import Foundation
import NIOCore
import Testing

/// Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: the test's real browser.
final class Browser: @unchecked Sendable {  // used from one test task
    static let path = "/usr/bin/chromium"
    let process: ChildProcess
    let profile: String
    let port: Int

    static func launch() async throws -> Browser {
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw ServiceError(description: "chromium is not installed (make test installs it)")
        }
        try TestServices.prepareRoot()
        let profile = FileManager.default.temporaryDirectory.appendingPathComponent("gw-chromium-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: profile, withIntermediateDirectories: true)
        let process = try TestServices.spawn(path, [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "--user-data-dir=" + profile, "--window-size=1280,800", "about:blank",
        ], log: profile + "/chromium.log")
        @Sendable func devToolsPort() -> Int? {
            let text = (try? String(contentsOfFile: profile + "/DevToolsActivePort", encoding: .utf8)) ?? ""
            return text.split(separator: "\n").first.flatMap { Int($0) }
        }
        do {
            try await eventually("chromium's DevTools port", timeout: 60) {
                guard process.isRunning else { throw ServiceError(description: "chromium exited: \(Self.log(profile))") }
                return devToolsPort() != nil
            }
        } catch {
            await process.terminate(SIGKILL)
            TestServices.forget(process)
            throw error
        }
        return Browser(process: process, profile: profile, port: devToolsPort()!)
    }

    private init(process: ChildProcess, profile: String, port: Int) {
        self.process = process
        self.profile = profile
        self.port = port
    }

    static func log(_ profile: String) -> String {
        String(((try? String(contentsOfFile: profile + "/chromium.log", encoding: .utf8)) ?? "").suffix(2000))
    }

    /// A new tab, driven over its own DevTools WebSocket.
    func newPage() async throws -> BrowserPage {
        // An explicit empty body: without Content-Length, NIO would send the PUT chunked, which DevTools does not read.
        let created = try await HTTPTestClient.request(.PUT, port: port, "/json/new?about:blank", body: "")
        guard let target = try JSONSerialization.jsonObject(with: Data(created.body.utf8)) as? [String: Any],
              let address = target["webSocketDebuggerUrl"] as? String, let url = URL(string: address)
        else { throw ServiceError(description: "no DevTools target: \(created.body)") }
        let socket = try await WSTestClient.connect(port: port, token: nil, path: url.path)
        let page = BrowserPage(socket: socket, targetId: target["id"] as? String ?? "")
        _ = try await page.call("Page.enable")
        _ = try await page.call("Runtime.enable")
        return page
    }

    /// Closes `page`'s tab as a user would (its connections with it), through DevTools' HTTP endpoint: unlike
    /// `Page.close`, which asks the page and may leave it open, the target is closed.
    func closeTab(_ page: BrowserPage) async throws {
        let answer = try await HTTPTestClient.request(.GET, port: port, "/json/close/\(page.targetId)")
        guard answer.status == 200 else { throw ServiceError(description: "DevTools did not close the tab: \(answer.status) \(answer.body)") }
        await page.close()
    }

    func close() async {
        await process.terminate(SIGKILL)
        TestServices.forget(process)
        try? FileManager.default.removeItem(atPath: profile)
    }
}

/// One tab: navigate, evaluate JavaScript (promises awaited), wait for a condition, take a screenshot.
final class BrowserPage: @unchecked Sendable {  // used from one test task
    private let socket: WSTestClient
    private var nextId = 1
    /// Its DevTools target.
    let targetId: String
    /// What the page printed and threw (`console.*`, uncaught exceptions), for failure messages.
    private(set) var console: [String] = []

    init(socket: WSTestClient, targetId: String) {
        self.socket = socket
        self.targetId = targetId
    }

    /// Sends one DevTools command and returns its `result` (events read meanwhile are kept as console lines).
    func call(_ method: String, _ params: [String: Any] = [:]) async throws -> [String: Any] {
        let id = nextId
        nextId += 1
        try await socket.send(["id": id, "method": method, "params": params])
        while true {
            guard let frame = try await socket.next(timeout: 60) else { throw ServiceError(description: "DevTools connection closed") }
            if frame["id"] as? Int == id {
                if let error = frame["error"] { throw ServiceError(description: "\(method): \(error)") }
                return frame["result"] as? [String: Any] ?? [:]
            }
            note(frame)
        }
    }

    private func note(_ event: [String: Any]) {
        let params = event["params"] as? [String: Any] ?? [:]
        switch event["method"] as? String {
        case "Runtime.consoleAPICalled":
            let args = (params["args"] as? [[String: Any]] ?? []).map { "\($0["value"] ?? $0["description"] ?? "")" }
            console.append("console.\(params["type"] ?? ""): " + args.joined(separator: " "))
        case "Runtime.exceptionThrown":
            let details = params["exceptionDetails"] as? [String: Any] ?? [:]
            console.append("exception: \((details["exception"] as? [String: Any])?["description"] ?? details["text"] ?? "")")
        default:
            break
        }
        if console.count > 200 { console.removeFirst(console.count - 200) }
    }

    func navigate(_ url: String) async throws {
        _ = try await call("Page.navigate", ["url": url])
    }

    /// The value of a JavaScript expression (a promise is awaited); a thrown exception fails.
    func evaluate(_ expression: String) async throws -> Any? {
        let result = try await call("Runtime.evaluate", ["expression": expression, "awaitPromise": true, "returnByValue": true])
        if let exception = result["exceptionDetails"] as? [String: Any] {
            throw ServiceError(description: "\(expression): \((exception["exception"] as? [String: Any])?["description"] ?? exception["text"] ?? "exception")")
        }
        return (result["result"] as? [String: Any])?["value"]
    }

    /// Waits until the expression is `true` in the page (a hang guard, not a timing assertion).
    func waitFor(_ what: String, _ expression: String, timeout: Double = 60) async throws {
        do {
            try await eventually(what, timeout: timeout) { (try? await self.evaluate(expression)) as? Bool == true }
        } catch {
            let state = (try? await evaluate("JSON.stringify({transport: window.demo?.transport, connected: window.demo?.connected, seqs: window.demo?.messages.map(m => m.seq), errors: window.demo?.errors})")) ?? nil
            throw ServiceError(description: "\(error): page state \(state ?? "?"); console: \(console.suffix(20).joined(separator: " | "))")
        }
    }

    /// A PNG of the viewport, written to `path`.
    func screenshot(to path: String) async throws {
        let result = try await call("Page.captureScreenshot", ["format": "png"])
        guard let base64 = result["data"] as? String, let data = Data(base64Encoded: base64) else { throw ServiceError(description: "no screenshot") }
        try FileManager.default.createDirectory(atPath: URL(fileURLWithPath: path).deletingLastPathComponent().path, withIntermediateDirectories: true)
        try data.write(to: URL(fileURLWithPath: path))
    }

    func close() async {
        await socket.close()
    }
}

/// Runs `body` with a fresh browser and closes it afterwards.
func withBrowser<T>(_ body: (Browser) async throws -> T) async throws -> T {
    try await withStarted({ try await Browser.launch() }, stop: { await $0.close() }, body)
}

/// Where tests put what they leave for people to look at (screenshots): never committed.
let testArtifacts = FileManager.default.currentDirectoryPath + "/.build/test-artifacts"
