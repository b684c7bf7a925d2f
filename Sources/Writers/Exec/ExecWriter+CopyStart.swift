import Foundation
import QuiesceCore

/// `quiesce dr test` for an owner's application, through the writer's own script (with
/// `dr_test = true` in its drop-in):
///
/// - `COMMAND dr-test-start WORK_DIR COPY_ROOT…` starts the application on the copy, privately (a
///   Unix socket under WORK_DIR, or a loopback port of its own), and exits 0 once it accepts
///   connections. It prints `access TEXT` lines (how testers reach it) and `state KEY=VALUE`
///   lines (what stopping it needs; `state pid=N` lets `dr test status` say whether it runs).
///   A daemon it starts must not keep the script's stdout open (`>/dev/null 2>&1 &`). A failed
///   start exits non-zero and leaves nothing running.
/// - `COMMAND dr-test-stop WORK_DIR COPY_ROOT…` stops it, told the state as
///   `QUIESCE_STATE_<KEY>`; it is called again after a failed stop and must exit 0 when the
///   application is already gone.
///
/// Both also get `QUIESCE_MARKER_<KEY>` (the marker recorded at freeze) and `QUIESCE_COPY_ROOTS`.
extension ExecWriter: CopyStartable {
    public var notStartableReason: String? {
        runsDRTest ? nil : "set dr_test = true in its drop-in, and give its script dr-test-start and dr-test-stop"
    }

    public func startOnCopy(_ copy: CopyLayout, marker: ConsistencyMarker, workDirectory: String) async throws -> RunningCopy {
        var (env, roots) = copyEnvironment("dr-test-start", copy: copy, marker: marker)
        env["QUIESCE_WORK_DIR"] = workDirectory
        let result = try await runOnCopy("dr-test-start", [workDirectory] + roots, env)
        var running = RunningCopy(writer: name, type: type, access: [],
                                  state: ["work_dir": workDirectory, "copy_roots": roots.joined(separator: ":")])
        for line in result.stdout.split(separator: "\n") {
            if line.hasPrefix("access ") {
                running.access.append(String(line.dropFirst("access ".count)))
            } else if line.hasPrefix("state "), let eq = line.firstIndex(of: "=") {
                let key = line[line.index(line.startIndex, offsetBy: "state ".count)..<eq]
                running.state[String(key)] = String(line[line.index(after: eq)...])
            }
        }
        if running.access.isEmpty { running.access = ["\(command) started it (its dr-test-start printed no `access` line)"] }
        return running
    }

    public func stopOnCopy(_ running: RunningCopy) async throws {
        var env = ["QUIESCE_PHASE": "dr-test-stop", "QUIESCE_WRITER": name]
        for (key, value) in running.state { env["QUIESCE_STATE_\(key.uppercased())"] = value }
        let work = running.state["work_dir"] ?? ""
        env["QUIESCE_WORK_DIR"] = work
        env["QUIESCE_COPY_ROOTS"] = running.state["copy_roots"] ?? ""
        let roots = (running.state["copy_roots"] ?? "").split(separator: ":").map(String.init)
        _ = try await runOnCopy("dr-test-stop", [work] + roots, env)
    }

    private func runOnCopy(_ action: String, _ arguments: [String], _ env: [String: String]) async throws -> CommandResult {
        let result = try await ChildProcess.run(command, [action] + arguments, extraEnvironment: env, timeout: timeout)
        if let failure = failure(of: result, action, limit: timeout, failedKind: .nonRetryable,
                                 timeoutHint: "a daemon it starts must not keep the script's output open: start it with `>/dev/null 2>&1 &`") {
            throw failure
        }
        return result
    }
}
