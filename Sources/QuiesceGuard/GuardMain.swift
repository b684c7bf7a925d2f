import CQuiesceSys
import Foundation
import QuiesceCore

/// The watchdog process (`quiesce guard`): holds the thaw duty for everything a checkpoint
/// freezes, so that nothing stays frozen when the coordinator dies or hangs.
///
/// - Its stdin is a pipe from the coordinator. EOF on it means the coordinator is gone
///   (exited, crashed, `kill -9`): every armed duty runs at once.
/// - Each duty has a deadline. When one passes, the coordinator is hung: the guard kills it
///   (which also drops its SQLite locks and database sessions), then runs every duty.
/// - It leaves the coordinator's session (`setsid`) and ignores SIGINT/SIGHUP/SIGTERM, so a
///   signal aimed at the coordinator's process group cannot take the guard down with it.
/// - It writes nothing until filesystems are thawed (its stderr may be a file on one of them).
public enum GuardMain {
    public static func run() -> Never {
        let coordinator = getppid()
        _ = setsid()
        for sig in [SIGINT, SIGHUP, SIGTERM, SIGPIPE] { signal(sig, SIG_IGN) }
        var state = GuardState()
        say("ready")

        var pending = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let timeoutMs: Int32
            if let next = state.nextDeadline() {
                let left = next - monotonicSeconds()
                if left <= 0 {
                    // The coordinator is hung past a deadline: stop it, then undo everything.
                    if getppid() == coordinator { kill(coordinator, SIGKILL) }
                    state.runAll(reason: "deadline passed with the coordinator still holding (pid \(coordinator) killed)")
                    exit(2)
                }
                timeoutMs = Int32(min(left * 1000 + 1, 1000))
            } else {
                timeoutMs = 1000
            }
            var descriptor = pollfd(fd: 0, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, timeoutMs)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let n = read(0, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                // Exit 1 when there was something to undo: the coordinator died holding it.
                let held = !state.isEmpty
                if held { state.runAll(reason: "the coordinator exited while holding") }
                exit(held ? 1 : 0)
            }
            pending += buffer[0..<n]
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                guard let request = try? JSONDecoder().decode(GuardRequest.self, from: Data(line)) else {
                    say("error malformed request")
                    continue
                }
                switch request.op {
                case .arm:
                    guard let id = request.id, let duty = request.duty, let seconds = request.seconds else {
                        say("error incomplete arm")
                        continue
                    }
                    if let failure = state.arm(id: id, duty: duty, deadline: monotonicSeconds() + seconds) {
                        say("error \(id) \(failure)")
                    } else {
                        say("ok \(id)")
                    }
                case .disarm:
                    if let id = request.id { state.disarm(id) }
                    say("ok \(request.id ?? -1)")
                case .armMany:
                    guard let ids = request.ids, let duties = request.duties, ids.count == duties.count,
                          let seconds = request.seconds, let first = ids.first else {
                        say("error incomplete armMany")
                        continue
                    }
                    let deadline = monotonicSeconds() + seconds
                    var failure: String?
                    for (id, duty) in zip(ids, duties) where failure == nil {
                        failure = state.arm(id: id, duty: duty, deadline: deadline)
                    }
                    say(failure.map { "error \(first) \($0)" } ?? "ok \(first)")
                case .disarmMany:
                    let ids = request.ids ?? []
                    state.disarm(Set(ids))
                    say("ok \(ids.first ?? -1)")
                case .close:
                    exit(0)
                }
            }
        }
    }

    static func say(_ line: String) {
        let text = line + "\n"
        _ = text.withCString { write(1, $0, strlen($0)) }
    }

    static func monotonicSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}

/// The armed duties, in arming order.
struct GuardState {
    struct Armed {
        var id: Int
        var duty: GuardDuty
        var deadline: Double
        /// For `thawFilesystem`: opened when armed, so the thaw never needs a path lookup.
        var fd: Int32 = -1
    }
    private var armed: [Armed] = []

    var isEmpty: Bool { armed.isEmpty }

    func nextDeadline() -> Double? { armed.map(\.deadline).min() }

    /// Returns an error text if the duty cannot be held.
    mutating func arm(id: Int, duty: GuardDuty, deadline: Double) -> String? {
        var entry = Armed(id: id, duty: duty, deadline: deadline)
        if case .thawFilesystem(let mount) = duty {
            entry.fd = open(mount, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if entry.fd < 0 { return "cannot open \(mount): \(String(cString: strerror(errno)))" }
        }
        armed.append(entry)
        return nil
    }

    mutating func disarm(_ id: Int) { disarm([id]) }

    mutating func disarm(_ ids: Set<Int>) {
        for entry in armed where ids.contains(entry.id) && entry.fd >= 0 { close(entry.fd) }
        armed.removeAll { ids.contains($0.id) }
    }

    /// Filesystems first (so that what follows cannot block on them), then the rest, newest first.
    mutating func runAll(reason: String) {
        var report: [String] = []
        for entry in armed.reversed() {
            guard case .thawFilesystem(let mount) = entry.duty else { continue }
            if quiesce_fithaw(entry.fd) == 0 {
                report.append("thawed \(mount)")
            } else if errno != EINVAL {
                report.append("FITHAW \(mount) failed: \(String(cString: strerror(errno)))")
            }
        }
        for entry in armed.reversed() {
            switch entry.duty {
            case .thawFilesystem:
                continue
            case .removeFile(let path, let expected):
                // Never someone else's lock of the same name (a delivery took it after ours went).
                if let expected, KernelFile.text(path) != expected {
                    continue
                }
                if unlink(path) == 0 { report.append("removed \(path)") }
            case .runCommand(let executable, let arguments, let environment, let timeout):
                do {
                    let result = try ChildProcess.runSync(executable, arguments, extraEnvironment: environment,
                                                          timeout: .milliseconds(Int64(timeout * 1000)))
                    report.append("ran \(executable) \(arguments.joined(separator: " ")): "
                                  + (result.timedOut ? "timed out" : "exit \(result.status)"))
                } catch {
                    report.append("could not run \(executable): \(error)")
                }
            }
        }
        armed.removeAll()
        let shown = report.count > 20 ? Array(report.prefix(20)) + ["… \(report.count - 20) more"] : report
        let text = "quiesce guard: \(reason); " + shown.joined(separator: "; ") + "\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
    }
}
