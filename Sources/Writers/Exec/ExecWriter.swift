import Foundation
import Logging
import QuiesceConfig
import QuiesceCore
import Synchronization

/// Builds `exec` writers: an application owner's own script, run as
/// `COMMAND freeze`, `COMMAND thaw`, `COMMAND freeze-failed` (and optionally `COMMAND verify ROOT`),
/// the convention of VMware's `backupScripts.d` and qemu's `fsfreeze-hook.d`.
///
/// ```toml
/// name = "app"
/// type = "exec"
/// command = "/usr/local/sbin/app-quiesce"
/// timeout = "30s"
/// order = 10
/// volume = "vm1"            # or volumes = ["vm1", "vm2"]; and/or paths = ["/srv/vm1/app"]
/// verify = false            # run `COMMAND verify COPY_ROOT` during DR verification
/// dr_test = false           # run `COMMAND dr-test-start` / `dr-test-stop` in `quiesce dr test`
/// ```
public struct ExecWriterFactory: WriterFactory {
    public let type = "exec"
    public init() {}

    public func make(_ spec: SpecReader, common: CommonWriterSettings) throws -> any Writer {
        let command = try spec.path("command")
        var volumes = try spec.optionalStringArray("volumes") ?? []
        if let volume = try spec.optionalString("volume") { volumes.insert(volume, at: 0) }
        let paths = try spec.optionalStringArray("paths") ?? []
        for path in paths where !path.hasPrefix("/") {
            throw spec.error("paths", "must be absolute paths, found \"\(path)\"")
        }
        if volumes.isEmpty && paths.isEmpty {
            throw spec.error(nil, "say which data the script protects: `volume = \"NAME\"`, `volumes = [...]` or `paths = [...]`")
        }
        let verify = try spec.bool("verify", default: false)
        let drTest = try spec.bool("dr_test", default: false)
        try spec.finish()
        return ExecWriter(common: common, command: command, volumes: volumes, paths: paths, runsVerify: verify,
                          runsDRTest: drTest)
    }
}

/// An application owner's script as a writer. A non-zero exit or a timeout in `freeze` vetoes
/// the checkpoint. Lines the script prints as `marker KEY=VALUE` are recorded as its marker.
public final class ExecWriter: Writer {
    public let name: String
    public let type = "exec"
    public let order: Int
    public let timeout: Duration
    public let command: String
    let volumes: [String]
    let paths: [String]
    let runsVerify: Bool
    let runsDRTest: Bool

    /// The guard's duty to run `freeze-failed` if we die after `freeze` started.
    private let duty = Mutex<GuardDutyID?>(nil)

    init(common: CommonWriterSettings, command: String, volumes: [String], paths: [String], runsVerify: Bool,
         runsDRTest: Bool = false) {
        self.name = common.name
        self.order = common.order
        self.timeout = common.timeout
        self.command = command
        self.volumes = volumes
        self.paths = paths
        self.runsVerify = runsVerify
        self.runsDRTest = runsDRTest
    }

    public func identify() async throws -> WriterFootprint {
        guard access(command, X_OK) == 0 else {
            throw WriterError(.nonRetryable, "\(command) is not an executable file",
                              hint: "install the script and `chmod +x` it, or fix `command` in the writer's spec")
        }
        return WriterFootprint(paths: paths, volumes: volumes)
    }

    public func prepare(_ context: CheckpointContext) async throws {}

    public func freeze(_ context: CheckpointContext) async throws -> ConsistencyMarker {
        // If the coordinator dies from here on, the guard tells the script the freeze failed.
        var undo = environment(context, action: "freeze-failed")
        undo["QUIESCE_OUTCOME"] = CheckpointOutcome.aborted.rawValue
        undo["QUIESCE_REASON"] = "coordinator-stopped"
        let id = try await context.guardian.arm(.runCommand(executable: command, arguments: ["freeze-failed"],
                                                             environment: undo, timeoutSeconds: timeout.seconds))
        duty.withLock { $0 = id }
        let result = try await run("freeze", context)
        var marker = ConsistencyMarker()
        for line in result.stdout.split(separator: "\n") where line.hasPrefix("marker ") {
            let pair = line.dropFirst("marker ".count)
            if let eq = pair.firstIndex(of: "=") {
                marker[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
            }
        }
        return marker
    }

    public func thaw(_ context: CheckpointContext, outcome: CheckpointOutcome) async throws {
        // VMware's convention: after a failed checkpoint every script hears `freeze-failed`.
        let action = outcome == .completed ? "thaw" : "freeze-failed"
        var extra = ["QUIESCE_OUTCOME": outcome.rawValue]
        if outcome == .aborted { extra["QUIESCE_REASON"] = "checkpoint-aborted" }
        _ = try await run(action, context, extra: extra)
        if let id = duty.withLock({ id -> GuardDutyID? in defer { id = nil }; return id }) {
            try? await context.guardian.disarm(id)
        }
    }

    public func verify(copy: CopyLayout, marker: ConsistencyMarker) async throws -> VerifyReport {
        guard runsVerify else { return VerifyReport(ok: true, details: ["no verify step configured (verify = false)"]) }
        let (env, roots) = copyEnvironment("verify", copy: copy, marker: marker)
        let result = try await ChildProcess.run(command, ["verify"] + roots, extraEnvironment: env, timeout: timeout)
        let output = (result.stdout + result.stderr).split(separator: "\n").map(String.init)
        if result.timedOut { return VerifyReport(ok: false, details: ["\(command) verify timed out"] + output) }
        return VerifyReport(ok: result.status == 0, details: ["\(command) verify exited \(result.status)"] + output)
    }

    /// What a script run on a copy (verify, DR test) is told: the marker recorded at freeze
    /// and the copy's roots (also its arguments).
    func copyEnvironment(_ phase: String, copy: CopyLayout, marker: ConsistencyMarker) -> ([String: String], [String]) {
        var env = ["QUIESCE_PHASE": phase, "QUIESCE_WRITER": name]
        for (key, value) in marker.fields { env["QUIESCE_MARKER_\(key.uppercased())"] = value }
        let roots = copy.mounts.values.sorted()
        env["QUIESCE_COPY_ROOTS"] = roots.joined(separator: ":")
        return (env, roots)
    }

    // MARK: Running the script

    private func environment(_ context: CheckpointContext, action: String) -> [String: String] {
        var env = [
            "QUIESCE_CHECKPOINT_ID": context.checkpointID,
            "QUIESCE_PHASE": action,
            "QUIESCE_WRITER": name,
            "QUIESCE_VOLUME": context.volumes.map(\.name).joined(separator: ","),
            "QUIESCE_MOUNT": context.volumes.compactMap(\.mount).joined(separator: ":"),
        ]
        if let label = context.label { env["QUIESCE_LABEL"] = label }
        return env
    }

    private func run(_ action: String, _ context: CheckpointContext, extra: [String: String] = [:]) async throws -> CommandResult {
        var env = environment(context, action: action)
        env.merge(extra) { _, new in new }
        let limit = context.remaining
        let result: CommandResult
        do {
            result = try await ChildProcess.run(command, [action], extraEnvironment: env, timeout: limit)
        } catch {
            throw WriterError(.nonRetryable, "cannot run \(command) \(action): \(error)")
        }
        for line in result.stdout.split(separator: "\n") {
            context.logger.info("\(line)", metadata: ["stream": "stdout", "action": "\(action)"])
        }
        for line in result.stderr.split(separator: "\n") {
            context.logger.warning("\(line)", metadata: ["stream": "stderr", "action": "\(action)"])
        }
        if let failure = failure(of: result, action, limit: limit, failedKind: .retryable,
                                 timeoutHint: "raise `timeout` in the writer's spec, or make the script return sooner") {
            throw failure
        }
        return result
    }

    /// Why a run of the script failed (killed at `limit`, or a non-zero exit, with its last
    /// line of stderr); nil when it succeeded.
    func failure(of result: CommandResult, _ action: String, limit: Duration, failedKind: WriterErrorKind,
                 timeoutHint: String) -> WriterError? {
        if result.timedOut {
            return WriterError(.timedOut, "\(command) \(action) did not finish within \(formatDuration(limit)) and was killed",
                               hint: timeoutHint)
        }
        guard result.status == 0 else {
            let last = result.stderr.split(separator: "\n").last.map { ": \($0)" } ?? ""
            return WriterError(failedKind, "\(command) \(action) exited with status \(result.status)\(last)")
        }
        return nil
    }
}
