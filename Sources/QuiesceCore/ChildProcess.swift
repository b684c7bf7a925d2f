import Foundation
import CQuiesceSys

/// A process started with posix_spawn, in a process group of its own so that a
/// timeout can kill it and everything it started.
public final class ChildProcess: @unchecked Sendable {
    public enum Stream: Sendable { case inherit, null, pipe }

    public let pid: pid_t
    /// Our ends of the pipes, when asked for (-1 otherwise). Owned by this object.
    public private(set) var stdinFD: Int32
    public private(set) var stdoutFD: Int32
    public private(set) var stderrFD: Int32
    private var reaped: Int32?

    /// Starts `executable` (looked up in PATH when it has no slash) with `arguments`.
    /// `environment` nil inherits ours; `extraEnvironment` is added on top either way.
    public init(_ executable: String, _ arguments: [String], environment: [String: String]? = nil,
                extraEnvironment: [String: String] = [:], workingDirectory: String? = nil,
                stdin: Stream = .null, stdout: Stream = .pipe, stderr: Stream = .pipe,
                newProcessGroup: Bool = true) throws {
        var env = environment ?? ProcessInfo.processInfo.environment
        env.merge(extraEnvironment) { _, new in new }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }

        var ours: [Int32] = [-1, -1, -1]
        var theirs: [Int32] = []
        func plumb(_ stream: Stream, _ target: Int32, readByChild: Bool) throws {
            switch stream {
            case .inherit: break
            case .null:
                posix_spawn_file_actions_addopen(&actions, target, "/dev/null", readByChild ? O_RDONLY : O_WRONLY, 0)
            case .pipe:
                var fds: [Int32] = [-1, -1]
                guard quiesce_pipe_cloexec(&fds) == 0 else { throw POSIXFailure("pipe", errno) }
                let (child, parent) = readByChild ? (fds[0], fds[1]) : (fds[1], fds[0])
                posix_spawn_file_actions_adddup2(&actions, child, target)
                ours[Int(target)] = parent
                theirs.append(child)
            }
        }
        try plumb(stdin, 0, readByChild: true)
        try plumb(stdout, 1, readByChild: false)
        try plumb(stderr, 2, readByChild: false)
        // Only stdin/out/err: a writer's script or daemon must not inherit our database
        // connections, lock files or sockets.
        quiesce_spawn_addclosefrom(&actions, 3)
        if let workingDirectory {
            quiesce_spawn_addchdir(&actions, workingDirectory)
        }
        var flags = Int32(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)
        if newProcessGroup {
            flags |= Int32(POSIX_SPAWN_SETPGROUP)
            posix_spawnattr_setpgroup(&attributes, 0)
        }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGCHLD] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(flags))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = executable.contains("/")
            ? posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
            : posix_spawnp(&pid, executable, &actions, &attributes, argv, envp)
        theirs.forEach { close($0) }
        guard rc == 0 else {
            ours.filter { $0 >= 0 }.forEach { close($0) }
            throw POSIXFailure("start \(executable)", rc)
        }
        self.pid = pid
        self.stdinFD = ours[0]
        self.stdoutFD = ours[1]
        self.stderrFD = ours[2]
    }

    deinit {
        [stdinFD, stdoutFD, stderrFD].filter { $0 >= 0 }.forEach { close($0) }
    }

    /// Close our end of the child's stdin (it sees EOF).
    public func closeStdin() {
        if stdinFD >= 0 { close(stdinFD); stdinFD = -1 }
    }

    /// Send a signal to the child's whole process group (or the child alone).
    public func signal(_ sig: Int32, group: Bool = true) {
        if reaped != nil { return }
        _ = group ? kill(-pid, sig) : kill(pid, sig)
    }

    /// Non-blocking: the exit status if it has exited (exit code, or 128 + signal).
    public func poll() -> Int32? {
        if let reaped { return reaped }
        var status: Int32 = 0
        let rc = waitpid(pid, &status, WNOHANG)
        guard rc == pid else { return nil }
        reaped = Self.decode(status)
        return reaped
    }

    /// Blocks until the child exits.
    @discardableResult
    public func wait() -> Int32 {
        if let reaped { return reaped }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = Self.decode(status)
        return reaped!
    }

    private static func decode(_ status: Int32) -> Int32 {
        let signal = status & 0x7f
        return signal == 0 ? (status >> 8) & 0xff : 128 + signal
    }
}

/// What a finished command did.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var timedOut: Bool
    public var succeeded: Bool { status == 0 && !timedOut }
}

extension ChildProcess {
    /// Runs a command to completion, capturing its output, killing its process group
    /// at the timeout. Blocking: call it through `runBlocking` from async code.
    public static func runSync(_ executable: String, _ arguments: [String], environment: [String: String]? = nil,
                               extraEnvironment: [String: String] = [:], input: String? = nil,
                               workingDirectory: String? = nil, timeout: Duration? = nil) throws -> CommandResult {
        let child = try ChildProcess(executable, arguments, environment: environment,
                                     extraEnvironment: extraEnvironment, workingDirectory: workingDirectory,
                                     stdin: input == nil ? .null : .pipe)
        if let input {
            var bytes = Array(input.utf8)
            var offset = 0
            while offset < bytes.count {
                let n = bytes.withUnsafeMutableBytes { write(child.stdinFD, $0.baseAddress! + offset, $0.count - offset) }
                if n <= 0 { break }
                offset += n
            }
            child.closeStdin()
        }
        let start = ContinuousClock.now
        var out = [UInt8](), err = [UInt8]()
        var open: Set<Int32> = [child.stdoutFD, child.stderrFD]
        var timedOut = false
        var exitedAt: ContinuousClock.Instant?
        var buffer = [UInt8](repeating: 0, count: 65536)
        while !open.isEmpty {
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            // Wake at the deadline itself, so the kill is not late by a poll interval.
            var wait: Int32 = 100
            if let timeout, !timedOut {
                wait = Int32(max(0, min(100, (timeout - (ContinuousClock.now - start)).milliseconds.rounded(.up))))
            }
            _ = Glibc.poll(&fds, nfds_t(fds.count), wait)
            for p in fds where p.revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if p.fd == child.stdoutFD { out += buffer[0..<n] } else { err += buffer[0..<n] }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    open.remove(p.fd)
                }
            }
            if let timeout, !timedOut, ContinuousClock.now - start > timeout {
                timedOut = true
                child.signal(SIGKILL)
            }
            // A daemonized grandchild may keep the pipes open: stop reading soon after the child exits.
            if exitedAt == nil, child.poll() != nil { exitedAt = .now }
            if let exitedAt, ContinuousClock.now - exitedAt > .milliseconds(500) { break }
        }
        let status = child.wait()
        return CommandResult(status: status, stdout: String(decoding: out, as: UTF8.self),
                             stderr: String(decoding: err, as: UTF8.self), timedOut: timedOut)
    }

    /// `runSync` on a thread of its own.
    public static func run(_ executable: String, _ arguments: [String], environment: [String: String]? = nil,
                           extraEnvironment: [String: String] = [:], input: String? = nil,
                           workingDirectory: String? = nil, timeout: Duration? = nil) async throws -> CommandResult {
        try await runBlocking {
            try runSync(executable, arguments, environment: environment, extraEnvironment: extraEnvironment,
                        input: input, workingDirectory: workingDirectory, timeout: timeout)
        }
    }
}

/// A failed system call, with what we were doing.
public struct POSIXFailure: Error, Sendable, CustomStringConvertible {
    public var operation: String
    public var code: Int32
    public init(_ operation: String, _ code: Int32) {
        self.operation = operation
        self.code = code
    }
    public var description: String { "\(operation): \(String(cString: strerror(code)))" }
}
