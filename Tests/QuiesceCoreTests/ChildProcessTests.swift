import Foundation
@testable import QuiesceCore
import Testing

@Suite struct ChildProcessTests {
    @Test func timeoutKillsTheWholeProcessGroup() async throws {
        let token = "600.\(getpid())\(Int.random(in: 1000...9999))"
        let started = ContinuousClock.now
        let result = try await ChildProcess.run("/bin/sh", ["-c", "sleep \(token); echo done"], timeout: .milliseconds(300))
        #expect(result.timedOut)
        // The sleep lasts 600 s: ending well before proves the kill. Not a speed bound: a loaded
        // CI machine once took 6.4 s to get here.
        #expect(ContinuousClock.now - started < .seconds(120))
        let left = try await ChildProcess.run("pgrep", ["-f", "sleep \(token)"])
        #expect(left.stdout.isEmpty, "the grandchild survived the timeout: pid \(left.stdout)")
    }

    @Test func capturesOutputAndExitStatus() async throws {
        let result = try await ChildProcess.run("/bin/sh", ["-c", "echo out; echo err >&2; exit 7"])
        #expect(result.status == 7)
        #expect(result.stdout == "out\n")
        #expect(result.stderr == "err\n")
        #expect(!result.timedOut)
    }

    @Test func childInheritsOnlyStandardDescriptors() async throws {
        // Deliberately not close-on-exec, and numbered high: `ls` itself opens low descriptors.
        let low = open("/dev/null", O_RDONLY)
        let fd = fcntl(low, F_DUPFD, 90)
        close(low)
        defer { close(fd) }
        let result = try await ChildProcess.run("/bin/sh", ["-c", "ls /proc/self/fd"])
        let descriptors = result.stdout.split(separator: "\n").compactMap { Int($0) }
        #expect(!descriptors.contains(Int(fd)), "descriptor \(fd) leaked into the child: \(descriptors)")
    }
}

@Suite struct LogGateTests {
    @Test func linesWaitUntilTheLastHoldIsReleased() {
        let gate = LogGate()
        gate.hold()
        gate.hold()
        gate.emit("held line")
        #expect(gate.pending == ["held line"])
        gate.release()
        #expect(gate.pending == ["held line"], "released while another hold was in effect")
        gate.release()
        #expect(gate.pending.isEmpty)
    }
}

