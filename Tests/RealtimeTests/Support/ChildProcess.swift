import Foundation

/// A child process started with posix_spawn and reaped by a thread of its own, so that waiting for it never
/// holds one of Swift's cooperative threads (there are 2 on this machine: two blocked waits used to starve
/// every other test task, including the timers that guard against hangs). Output goes to a file; the child
/// inherits no descriptor of the test process but 0–2.
final class ChildProcess: @unchecked Sendable {  // `status` and `waiters` guarded by `lock`
    let pid: pid_t
    private let lock = NSLock()
    private var status: Int32?
    /// When the reaper saw the exit (not when a waiting task got to run: on a loaded machine that is later).
    private var exited: Date?
    private var waiters: [CheckedContinuation<Int32, Never>] = []

    private typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    private static let closeFrom: CloseFrom? = dlsym(dlopen(nil, RTLD_NOW), "posix_spawn_file_actions_addclosefrom_np")
        .map { unsafeBitCast($0, to: CloseFrom.self) }

    init(_ path: String, _ arguments: [String], environment: [String: String]? = nil, output: String = "/dev/null") throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        _ = Self.closeFrom?(&actions, 3)
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        let env: [UnsafeMutablePointer<CChar>?] = (environment ?? ProcessInfo.processInfo.environment)
            .map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + env).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, env)
        guard rc == 0 else { throw ServiceError(description: "cannot start \(path): \(String(cString: strerror(rc)))") }
        self.pid = pid
        let child = pid
        Thread { [self] in
            var raw: Int32 = 0
            while waitpid(child, &raw, 0) == -1 && errno == EINTR {}
            finish(raw)
        }.start()
    }

    private func finish(_ raw: Int32) {
        // Exit code when it exited, 128 + signal when a signal ended it (as a shell reports it).
        let code = raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
        let now = Date()
        lock.lock()
        status = code
        exited = now
        let waiting = waiters
        waiters = []
        lock.unlock()
        for waiter in waiting { waiter.resume(returning: code) }
    }

    /// When the process exited, as its reaper saw it (nil while it runs).
    var exitedAt: Date? {
        lock.lock()
        defer { lock.unlock() }
        return exited
    }

    var isRunning: Bool {
        lock.lock()
        defer { lock.unlock() }
        return status == nil
    }

    /// Waits (without holding a thread) until the process has exited; returns its exit status.
    @discardableResult
    func exitStatus() async -> Int32 {
        await withCheckedContinuation { continuation in
            lock.lock()
            if let status {
                lock.unlock()
                continuation.resume(returning: status)
            } else {
                waiters.append(continuation)
                lock.unlock()
            }
        }
    }

    /// Sends `signal` (unless it has exited already) and waits for the exit.
    func terminate(_ signal: Int32) async {
        if isRunning { kill(pid, signal) }
        await exitStatus()
    }
}
