import Foundation
import Logging
import Quiesce
import QuiesceCore
import QuiesceTestSupport

/// A quiesce installation inside a test world: config, writers.d, catalog and hook scripts
/// under the world's directory, outside the guest filesystem (which gets frozen).
struct TestSite: Sendable {
    let world: TestWorld
    var etc: String { world.path("etc") }
    var config: String { "\(etc)/quiesce.toml" }
    var writersDirectory: String { "\(etc)/writers.d" }
    var catalog: String { world.path("state/catalog.db") }
    var hooks: String { world.path("hooks") }
    var logs: String { world.path("logs") }

    init(_ world: TestWorld, holdTimeout: String = "10s", freezeTimeout: String = "20s") throws {
        self.world = world
        for directory in [etc, writersDirectory, world.path("state"), hooks, logs] {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            chmod(directory, 0o755)
        }
        var text = """
            [coordinator]
            catalog = "\(catalog)"
            writers_dir = "\(writersDirectory)"
            freeze_timeout = "\(freezeTimeout)"
            hold_timeout = "\(holdTimeout)"

            """
        for volume in world.volumes {
            text += """

                [[volume]]
                name = "\(volume.name)"
                image = "\(volume.image)"
                mount = "\(volume.mount!)"

                """
        }
        try text.write(toFile: config, atomically: true, encoding: .utf8)
    }

    /// An exec writer whose script logs every call (`<action> <checkpoint id>`) to `logs/<name>.log`.
    /// `onFreeze` is shell run at freeze after logging (e.g. `exit 3`, `sleep 600`).
    @discardableResult
    func addExecWriter(_ name: String, order: Int = 0, timeout: String = "10s", onFreeze: String = "") throws -> String {
        let script = "\(hooks)/\(name)"
        let log = "\(logs)/\(name).log"
        try """
            #!/bin/sh
            echo "$1 $QUIESCE_CHECKPOINT_ID writer=$QUIESCE_WRITER volume=$QUIESCE_VOLUME outcome=$QUIESCE_OUTCOME" >> \(log)
            if [ "$1" = freeze ]; then
                echo "marker calls=$(wc -l < \(log))"
                \(onFreeze)
            fi
            exit 0

            """.write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        try """
            name = "\(name)"
            type = "exec"
            command = "\(script)"
            volume = "\(world.volume.name)"
            order = \(order)
            timeout = "\(timeout)"

            """.write(toFile: "\(writersDirectory)/\(name).toml", atomically: true, encoding: .utf8)
        chmod("\(writersDirectory)/\(name).toml", 0o600)
        return log
    }

    /// The calls a hook script received, in order (`freeze`, `thaw`, `freeze-failed`).
    func calls(_ name: String) -> [String] {
        let text = (try? String(contentsOfFile: "\(logs)/\(name).log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").map { String($0.split(separator: " ")[0]) }
    }

    func installation() throws -> Installation {
        try Installation(configPath: config, guardExecutable: try Executables.requireQuiesce(), logger: Logger(label: "test"))
    }

    /// Files left in a volume's snapshot directory (`<id>.img`, `<id>.img.partial`).
    func snapshotFiles(_ volume: Volume? = nil) -> [String] {
        let directory = (volume ?? world.volume).snapshotDirectory
        return ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".img") || $0.hasSuffix(".partial") }
    }

    /// Starts `quiesce ARGS --config <site>` as a child process (stdout/stderr captured).
    func startCLI(_ arguments: [String], environment: [String: String] = [:]) throws -> ChildProcess {
        try ChildProcess(try Executables.requireQuiesce(), arguments + ["--config", config],
                         extraEnvironment: environment, stdin: .null, stdout: .pipe, stderr: .pipe)
    }

    /// Runs `quiesce ARGS --config <site>` to completion.
    func runCLI(_ arguments: [String], environment: [String: String] = [:], timeout: Duration = .seconds(120)) async throws -> CommandResult {
        try await ChildProcess.run(try Executables.requireQuiesce(), arguments + ["--config", config],
                                   extraEnvironment: environment, timeout: timeout)
    }
}

/// Runs `quiesce ARGS` without a site's config (the DR side's commands) to completion.
func quiesce(_ arguments: [String], timeout: Duration = .seconds(180)) async throws -> CommandResult {
    try await ChildProcess.run(try Executables.requireQuiesce(), arguments, timeout: timeout)
}

/// Waits until `condition` holds, polling; false at the deadline.
func eventually(within limit: Duration, every step: Duration = .milliseconds(20), _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + limit
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: step)
    }
    return condition()
}

/// Writes `text` to `path` and fsyncs it, on a thread of its own (it blocks while the filesystem is frozen).
func writeDurably(_ text: String, to path: String) async throws {
    try await runBlocking {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw POSIXFailure("open \(path)", errno) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard write(fd, bytes, bytes.count) == bytes.count, fsync(fd) == 0 else { throw POSIXFailure("write \(path)", errno) }
    }
}

/// Reads whatever a finished child printed on a pipe.
func drain(_ fd: Int32) -> String {
    var output = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while fd >= 0 {
        let n = read(fd, &buffer, buffer.count)
        if n <= 0 { break }
        output += buffer[0..<n]
    }
    return String(decoding: output, as: UTF8.self)
}

/// Writes small files into a directory in a loop (open, write, fsync, close), recording when
/// each was issued and completed: a write pending for long means the filesystem is held.
/// It tells a test *that* the guest is frozen, instead of guessing when from a sleep.
final class StallProbe: @unchecked Sendable {
    struct Write: Sendable {
        var name: String
        var issued: ContinuousClock.Instant
        var completed: ContinuousClock.Instant?
    }

    private let directory: String
    private let lock = NSLock()
    private var log: [Write] = []
    private var stopping = false
    private let finished = DispatchSemaphore(value: 0)

    /// `onStall` runs once, on a watcher thread of its own, as soon as a write has been pending
    /// longer than `threshold`: a test acts inside the hold even when its own tasks are slow to
    /// be scheduled (the test process's two cooperative threads may be busy with other tests).
    init(directory: String, threshold: Duration = .milliseconds(200), onStall: (@Sendable (Write) -> Void)? = nil) {
        self.directory = directory
        let thread = Thread { [self] in run() }
        thread.start()
        if let onStall {
            let watcher = Thread { [self] in
                while !lock.withLock({ stopping }) {
                    if let write = stalled(longerThan: threshold) {
                        onStall(write)
                        lock.withLock { firedAt = (write, .now) }
                        return
                    }
                    usleep(5_000)
                }
            }
            watcher.start()
        }
    }

    private var firedAt: (Write, ContinuousClock.Instant)?

    /// The write that was pending when `onStall` ran, and when it ran.
    var stall: (write: Write, actedAt: ContinuousClock.Instant)? { lock.withLock { firedAt.map { ($0.0, $0.1) } } }

    var writes: [Write] { lock.withLock { log } }

    private func run() {
        var seq = 0
        while !lock.withLock({ stopping }) {
            seq += 1
            let name = String(format: "probe-%06d", seq)
            lock.withLock { log.append(Write(name: name, issued: .now)) }
            let fd = open("\(directory)/\(name)", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            if fd >= 0 {
                _ = name.withCString { write(fd, $0, strlen($0)) }
                fsync(fd)
                close(fd)
            }
            lock.withLock { log[log.count - 1].completed = .now }
            usleep(2_000)
        }
        finished.signal()
    }

    /// The write pending right now, if it has been pending longer than `threshold`.
    func stalled(longerThan threshold: Duration) -> Write? {
        guard let last = writes.last, last.completed == nil, ContinuousClock.now - last.issued > threshold else { return nil }
        return last
    }

    /// Waits until a write has been pending longer than `threshold` (the filesystem is held).
    func waitForStall(longerThan threshold: Duration = .milliseconds(200), within limit: Duration) async -> Write? {
        let deadline = ContinuousClock.now + limit
        while ContinuousClock.now < deadline {
            if let write = stalled(longerThan: threshold) { return write }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return nil
    }

    /// When the write named `name` completed (nil if it has not, yet).
    func completion(of name: String) -> ContinuousClock.Instant? {
        writes.first { $0.name == name }?.completed
    }

    /// Stops the loop (waiting for the write in flight, which may be held by a freeze).
    func stop() async {
        lock.withLock { stopping = true }
        let finished = self.finished
        _ = try? await runBlocking { finished.wait() }
    }
}

/// Waits for a child to exit, at most `limit`; nil if it is still running.
func exitStatus(of child: ChildProcess, within limit: Duration) async -> Int32? {
    let deadline = ContinuousClock.now + limit
    while ContinuousClock.now < deadline {
        if let status = child.poll() { return status }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return child.poll()
}

extension ChildProcess {
    /// Whatever happened in the test, the child must not outlive it (nor stay stopped).
    func terminate() {
        signal(SIGKILL, group: false)
        signal(SIGCONT, group: false)
        wait()
    }
}

/// Processes of this host (not this one) whose command line contains `text`, as "PID CMDLINE"
/// (a copy's postmaster names its data directory, an ssh session its remote command).
func processes(commandContaining text: String) -> [String] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { entry -> String? in
        guard let pid = pid_t(entry), pid != getpid(),
              let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline"), !data.isEmpty else { return nil }
        let cmdline = String(decoding: data.map { $0 == 0 ? UInt8(ascii: " ") : $0 }, as: UTF8.self)
        return cmdline.contains(text) ? "\(pid) \(cmdline)" : nil
    }
}
