import Foundation
import QuiesceCore

/// A real OpenSSH server on 127.0.0.1 for one test: its own host key, config, authorized client key, port.
///
/// ```swift
/// try await SSHServer.with { server in
///     let result = try await ChildProcess.run("ssh", server.clientOptions + [server.destination, "quiesce receive …"])
/// }
/// ```
///
/// The server is Debian's `/usr/sbin/sshd` (openssh-server), run as root in the foreground
/// (`sshd -D`) as a child of the test, logging errors to `<directory>/sshd.log`. It accepts
/// only the fixture's client key, for root (and any local user), and nothing else: no
/// passwords, no keyboard-interactive, no PAM. The remote command runs through the user's
/// login shell with sshd's default PATH.
public final class SSHServer: Sendable {
    public static let sshd = "/usr/sbin/sshd"

    public let port: Int
    public let directory: String
    /// `user@host` to pass to `ssh` after `clientOptions`: `root@127.0.0.1`.
    public let destination: String
    /// The client's private key (its public half is the only authorized key).
    public let clientKey: String
    /// The known_hosts file that holds exactly this server's host key, as `[127.0.0.1]:port`.
    public let knownHosts: String
    /// sshd's log (LogLevel ERROR).
    public let logFile: String
    /// `ssh` options that reach this server as root non-interactively and trust exactly its host key,
    /// ignoring the user's and the system's ssh configuration and known hosts:
    /// `["-F", "/dev/null", "-p", port, "-i", clientKey, "-o", "UserKnownHostsFile=…", "-o", "StrictHostKeyChecking=yes", …]`.
    public let clientOptions: [String]

    private let process: ChildProcess
    private let stopped = StopFlag()

    private init(port: Int, directory: String, process: ChildProcess) {
        self.port = port
        self.directory = directory
        self.destination = "root@127.0.0.1"
        self.clientKey = directory + "/client_ed25519"
        self.knownHosts = directory + "/known_hosts"
        self.logFile = directory + "/sshd.log"
        self.process = process
        self.clientOptions = [
            "-F", "/dev/null",
            "-p", "\(port)",
            "-i", directory + "/client_ed25519",
            "-o", "UserKnownHostsFile=\(directory)/known_hosts",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "CheckHostIP=no",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no",
            "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR",
        ]
    }

    /// What is missing to run an `SSHServer`, each with its fix; empty when it can run.
    public static var missing: [String] {
        var missing: [String] = []
        if access(sshd, X_OK) != 0 {
            missing.append("no OpenSSH server at \(sshd): run `scripts/install-deps` (apt-get install openssh-server)")
        }
        for (tool, package) in [("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")] where TestEnvironment.locate(tool) == nil {
            missing.append("\(tool) not found: run `scripts/install-deps` (apt-get install \(package))")
        }
        if geteuid() != 0 { missing.append("not running as root (sshd needs it to log in as root): run `sudo swift test`") }
        return missing
    }

    /// Throws, naming each missing prerequisite and its fix, unless an `SSHServer` can run here.
    public static func requireServer() throws {
        let missing = missing
        guard missing.isEmpty else { throw MissingPrerequisite("ssh tests cannot run here: " + missing.joined(separator: "; ")) }
    }

    /// Generates keys and a config in `directory` (which must exist), starts sshd on a free
    /// loopback port and waits until it accepts connections. Blocking (up to ~15 s).
    /// The caller must `stop()` it.
    public static func start(in directory: String) throws -> SSHServer {
        try requireServer()
        try makePrivilegeSeparationDirectory()
        let hostKey = directory + "/host_ed25519"
        let clientKey = directory + "/client_ed25519"
        for key in [hostKey, clientKey] {
            try? FileManager.default.removeItem(atPath: key)
            try? FileManager.default.removeItem(atPath: key + ".pub")
            let result = try ChildProcess.runSync("ssh-keygen", ["-q", "-N", "", "-t", "ed25519", "-C", "quiesce-test", "-f", key],
                                                  timeout: .seconds(30))
            guard result.succeeded else {
                throw TestSupportError("ssh-keygen -f \(key) failed (\(result.status)): \(result.stdout)\(result.stderr)")
            }
        }
        let hostPublic = try String(contentsOfFile: hostKey + ".pub", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        try FileManager.default.copyItem(atPath: clientKey + ".pub", toPath: directory + "/authorized_keys.tmp")
        try? FileManager.default.removeItem(atPath: directory + "/authorized_keys")
        try FileManager.default.moveItem(atPath: directory + "/authorized_keys.tmp", toPath: directory + "/authorized_keys")

        // Another process may take the port between our probe and sshd's bind: try a few.
        var lastFailure: (any Error)?
        for attempt in 0..<3 {
            let port = LoopbackPort.free(fallback: 42000 + Int(getpid() % 10000) + attempt)
            try writeConfig(directory: directory, port: port, hostKey: hostKey)
            try "[127.0.0.1]:\(port) \(hostPublic)\n".write(toFile: directory + "/known_hosts", atomically: true, encoding: .utf8)
            let logFile = directory + "/sshd.log"
            try? FileManager.default.removeItem(atPath: logFile)
            // -D: stay in the foreground as our child; -E: errors to the log (a pipe nobody
            // drains could fill and block sshd). An absolute path: sshd re-execs itself.
            let process = try ChildProcess(sshd, ["-D", "-E", logFile, "-f", directory + "/sshd_config"],
                                           stdin: .null, stdout: .null, stderr: .null, newProcessGroup: true)
            let server = SSHServer(port: port, directory: directory, process: process)
            do {
                try server.waitUntilListening(timeout: .seconds(15))
                return server
            } catch let error as SSHServerExited {
                server.stop()
                lastFailure = error
                if error.log.contains("Address already in use") { continue }
                throw error
            } catch {
                server.stop()
                throw error
            }
        }
        throw lastFailure ?? TestSupportError("sshd did not start")
    }

    /// Starts a server in a new temporary directory, runs `body`, and always stops it
    /// (also when `body` throws) and removes the directory.
    public static func with<T>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (SSHServer) async throws -> T
    ) async throws -> T {
        try requireServer()
        return try await withTemporaryDirectory { directory in
            let server = try await runBlocking { try SSHServer.start(in: directory) }
            let result: Result<T, any Error>
            do { result = .success(try await body(server)) } catch { result = .failure(error) }
            server.stop()
            return try result.get()
        }
    }

    /// Stops the server and everything it started (per-connection sshd processes and their
    /// sessions, which sshd puts in sessions of their own), and reaps it. Idempotent.
    public func stop() {
        guard stopped.markStopped() else { return }
        let listener = process.pid
        if process.poll() == nil {
            // Freeze the tree first, so that nothing forks while it is being killed and no
            // process escapes by being reparented away from it.
            _ = kill(listener, SIGSTOP)
            var frozen: Set<pid_t> = []
            while true {
                let new = Self.descendants(of: listener).subtracting(frozen)
                if new.isEmpty { break }
                for pid in new { _ = kill(pid, SIGSTOP) }
                frozen.formUnion(new)
            }
            for pid in frozen { _ = kill(pid, SIGKILL) }
            process.signal(SIGKILL, group: true)
            process.signal(SIGKILL, group: false)
        }
        process.wait()
        try? FileManager.default.removeItem(atPath: directory + "/sshd.pid")
    }

    /// Whether something accepts TCP connections on 127.0.0.1:`port`.
    public static func accepts(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }

    /// sshd's log so far.
    public var log: String { (try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "" }

    // MARK: setup

    private func waitUntilListening(timeout: Duration) throws {
        let start = ContinuousClock.now
        while true {
            if let status = process.poll() {
                throw SSHServerExited(status: status, log: log)
            }
            if Self.accepts(port: port) {
                // The port might belong to someone else that grabbed it: make sure sshd still runs.
                if let status = process.poll() { throw SSHServerExited(status: status, log: log) }
                return
            }
            if ContinuousClock.now - start > timeout {
                throw TestSupportError("sshd did not listen on 127.0.0.1:\(port) within \(timeout): \(log)")
            }
            usleep(20_000)
        }
    }

    private static func writeConfig(directory: String, port: Int, hostKey: String) throws {
        // Sessions get a HOME of their own: bash run by sshd sources ~/.bashrc, and a user's
        // profile (root's pyenv here, whose rehash lock a killed session leaves behind for
        // 60 s) must not decide how long a test's remote command takes.
        let home = directory + "/home"
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
        try """
            # A test's own sshd (QuiesceTestSupport.SSHServer).
            ListenAddress 127.0.0.1
            Port \(port)
            AddressFamily inet
            HostKey \(hostKey)
            PidFile \(directory)/sshd.pid
            AuthorizedKeysFile \(directory)/authorized_keys
            AuthorizedPrincipalsFile none
            PermitRootLogin prohibit-password
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            HostbasedAuthentication no
            UsePAM no
            StrictModes no
            UseDNS no
            PrintMotd no
            PrintLastLog no
            X11Forwarding no
            PermitUserEnvironment no
            LogLevel ERROR
            MaxStartups 50
            MaxSessions 50
            SetEnv HOME=\(home)

            """.write(toFile: directory + "/sshd_config", atomically: true, encoding: .utf8)
    }

    /// sshd refuses to start without its privilege-separation directory (a tmpfs on a
    /// normal host, absent in a container).
    private static func makePrivilegeSeparationDirectory() throws {
        var info = stat()
        if stat("/run/sshd", &info) == 0 { return }
        if mkdir("/run/sshd", 0o755) != 0 && errno != EEXIST {
            throw TestSupportError("cannot create sshd's privilege-separation directory /run/sshd: \(String(cString: strerror(errno)))")
        }
        chmod("/run/sshd", 0o755)
    }

    /// The live processes below `root`, from /proc.
    private static func descendants(of root: pid_t) -> Set<pid_t> {
        var children: [pid_t: [pid_t]] = [:]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry),
                  let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // "pid (comm) state ppid …": comm may contain spaces and parentheses.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 2, let parent = pid_t(fields[1]) else { continue }
            children[parent, default: []].append(pid)
        }
        var found: Set<pid_t> = []
        var queue = [root]
        while let next = queue.popLast() {
            for child in children[next] ?? [] where found.insert(child).inserted { queue.append(child) }
        }
        return found
    }
}

/// sshd exited before it listened.
struct SSHServerExited: Error, CustomStringConvertible {
    var status: Int32
    var log: String
    var description: String { "sshd exited with status \(status) before listening: \(log)" }
}

/// Set once, by the first `stop()`.
private final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false

    /// True the first time only.
    func markStopped() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if stopped { return false }
        stopped = true
        return true
    }
}
