import Foundation
import QuiesceCore
import QuiesceTestSupport
import Testing

/// The `SSHServer` fixture the `ssh://` replication tests run against: a real sshd on loopback.
@Suite(.serialized, .enabled(if: TestEnvironment.canBuildWorlds || TestEnvironment.isCI))
struct SSHServerTests {
    /// The system's ssh client reaches the fixture's sshd as root with only the fixture's options
    /// (no prompt, its host key trusted), stdin and stdout pass through byte for byte, the remote
    /// command gets a PATH; after stop nothing listens on the port and no session survives.
    @Test func sshRoundTripsStdinAndStopClosesThePortAndEndsSessions() async throws {
        try SSHServer.requireServer()
        let marker = "quiesce-ssh-test-\(UUID().uuidString)"
        var lingering: ChildProcess?
        let (port, directory) = try await SSHServer.with { server in
            #expect(SSHServer.accepts(port: server.port))

            let input = "some stdin bytes\nsecond line \u{00e9}\u{2603}\nno newline at the end"
            let echo = try await ChildProcess.run("ssh", server.clientOptions + [server.destination, "echo hello; cat"],
                                                  input: input, timeout: .seconds(60))
            #expect(echo.succeeded, "ssh failed (\(echo.status)): \(echo.stderr)\nsshd: \(server.log)")
            #expect(echo.stdout == "hello\n" + input)

            let environment = try await ChildProcess.run("ssh", server.clientOptions + [server.destination, "id -u; echo \"$PATH\""],
                                                         timeout: .seconds(60))
            #expect(environment.succeeded, "ssh failed (\(environment.status)): \(environment.stderr)")
            let lines = environment.stdout.split(separator: "\n").map(String.init)
            #expect(lines.first == "0", "not root: \(environment.stdout)")
            #expect(lines.dropFirst().first?.split(separator: ":").contains("/usr/bin") == true, "remote PATH: \(environment.stdout)")

            // A session still open when the server stops.
            let session = try ChildProcess("ssh", server.clientOptions + [server.destination, "sleep 300; : \(marker)"],
                                           stdin: .null, stdout: .null, stderr: .null)
            lingering = session
            // The remote shell, not our ssh client (whose command line holds the marker too).
            #expect(await eventually(within: .seconds(20)) { !processes(containing: marker, excluding: session.pid).isEmpty },
                    "the remote session did not start: \(server.log)")
            return (server.port, server.directory)
        }

        #expect(!SSHServer.accepts(port: port), "something still listens on 127.0.0.1:\(port) after stop")
        #expect(processes(containing: directory + "/sshd_config").isEmpty, "sshd survived stop")
        #expect(await eventually(within: .seconds(10)) { processes(containing: marker, excluding: lingering?.pid).isEmpty },
                "the remote session survived stop: \(processes(containing: marker, excluding: lingering?.pid))")
        if let session = lingering {
            let ended = await eventually(within: .seconds(20)) { session.poll() != nil }
            #expect(ended, "the ssh client still runs after the server stopped")
            if !ended { session.signal(SIGKILL) }
            _ = try await runBlocking { session.wait() }
        }
    }
}

/// Pids whose command line contains `text`, other than ours and `excluding`.
private func processes(containing text: String, excluding: pid_t? = nil) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { entry -> pid_t? in
        guard let pid = pid_t(entry), pid != getpid(), pid != excluding,
              let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return nil }
        let commandLine = String(decoding: data.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
        return commandLine.contains(text) ? pid : nil
    }
}
