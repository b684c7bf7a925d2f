import Foundation
import QuiesceCore

/// A system tool (`losetup`, `mount`, `mkfs.xfs`, …) that failed: the command line,
/// its exit status, what it printed on stderr, and the fix when we know it.
public struct SystemCommandError: Error, Sendable, CustomStringConvertible {
    /// The tool and its arguments.
    public var command: [String]
    /// The exit status (128 + signal if it was killed).
    public var status: Int32
    public var stderr: String
    /// It was killed at its timeout.
    public var timedOut: Bool
    public var hint: String?

    public init(command: [String], status: Int32, stderr: String, timedOut: Bool = false, hint: String? = nil) {
        self.command = command
        self.status = status
        self.stderr = stderr
        self.timedOut = timedOut
        self.hint = hint
    }

    public var description: String {
        let line = command.map(SystemCommand.quote).joined(separator: " ")
        let what = timedOut ? "timed out and was killed" : "failed with exit status \(status)"
        let said = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        return "`\(line)` \(what)" + (said.isEmpty ? "" : ": \(said)") + (hint.map { "\n       (\($0))" } ?? "")
    }
}

/// Runs system tools for the lab and the tests.
public enum SystemCommand {
    /// Where administration tools live even when PATH (sudo, cron) leaves them out.
    public static let fallbackDirectories = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]

    /// The absolute path of `tool`, from PATH then the sbin directories; nil if absent.
    public static func locate(_ tool: String) -> String? {
        if tool.contains("/") { return access(tool, X_OK) == 0 ? tool : nil }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = path.split(separator: ":").map(String.init) + fallbackDirectories
        return directories.lazy.map { "\($0)/\(tool)" }.first { access($0, X_OK) == 0 }
    }

    /// Runs `tool arguments…` to completion; throws `SystemCommandError` unless it exits 0.
    @discardableResult
    public static func run(_ tool: String, _ arguments: [String], timeout: Duration, hint: String? = nil) async throws -> CommandResult {
        guard let executable = locate(tool) else {
            throw SystemCommandError(command: [tool] + arguments, status: 127, stderr: "\(tool): command not found",
                                     hint: hint ?? "install the package that provides \(tool) (util-linux, xfsprogs, e2fsprogs, btrfs-progs)")
        }
        let result = try await ChildProcess.run(executable, arguments, environment: environment, timeout: timeout)
        guard result.succeeded else {
            throw SystemCommandError(command: [tool] + arguments, status: result.status, stderr: result.stderr,
                                     timedOut: result.timedOut, hint: hint)
        }
        return result
    }

    /// Our environment with a C locale, so that messages we match (`target is busy`) are in English.
    private static var environment: [String: String] {
        var env = ProcessInfo.processInfo.environment
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        return env
    }

    /// Waits `duration` even if the task is cancelled: teardown paths retry through
    /// this and must not turn into a busy loop when a test is cancelled.
    public static func pause(_ duration: Duration) async {
        let nanoseconds = Int(duration.milliseconds * 1_000_000)
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(nanoseconds)) { continuation.resume() }
        }
    }

    public static func quote(_ word: String) -> String {
        let plain = word.allSatisfy { $0.isLetter || $0.isNumber || "-_./=,:@%+".contains($0) }
        return plain && !word.isEmpty ? word : "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}
