import Foundation
import QuiesceCore
import Synchronization

/// The coordinator's handle on a running `quiesce guard` process.
///
/// Writers of one order group arm duties concurrently: each request and its answer form one
/// exchange under a lock (an actor would not do: it is reentrant at every `await`, and two
/// exchanges would interleave their lines).
public final class GuardProcess: FreezeGuardSession {
    private let child: ChildProcess
    private let channel: Mutex<Channel>

    private struct Channel {
        var nextID = 1
        var reader = LineReader()
    }

    /// Starts `executable guard` and waits until it says it is ready.
    public static func start(executable: String) async throws -> GuardProcess {
        let child = try ChildProcess(executable, ["guard"], stdin: .pipe, stdout: .pipe, stderr: .inherit,
                                     newProcessGroup: false)
        let process = GuardProcess(child: child)
        let line = try await runBlocking { try process.channel.withLock { try $0.reader.next(fd: child.stdoutFD, timeout: .seconds(5)) } }
        guard line == "ready" else {
            child.signal(SIGKILL, group: false)
            child.wait()
            throw GuardError("\(executable) guard did not start (said \(line.debugDescription))")
        }
        return process
    }

    private init(child: ChildProcess) {
        self.child = child
        self.channel = Mutex(Channel())
    }

    public func arm(_ duty: GuardDuty, deadline: ContinuousClock.Instant) async throws -> GuardDutyID {
        let id = try await runBlocking { () throws -> Int in
            try self.channel.withLock { channel in
                let id = channel.nextID
                channel.nextID += 1
                let seconds = max(0, (deadline - .now).seconds)
                let answer = try self.exchange(GuardRequest(op: .arm, id: id, seconds: seconds, duty: duty), &channel)
                guard answer == "ok \(id)" else { throw GuardError("the guard refused a duty: \(answer)") }
                return id
            }
        }
        return GuardDutyID(id)
    }

    public func arm(all duties: [GuardDuty], deadline: ContinuousClock.Instant) async throws -> [GuardDutyID] {
        guard !duties.isEmpty else { return [] }
        let ids = try await runBlocking { () throws -> [Int] in
            try self.channel.withLock { channel in
                let ids = Array(channel.nextID..<(channel.nextID + duties.count))
                channel.nextID += duties.count
                let seconds = max(0, (deadline - .now).seconds)
                let answer = try self.exchange(GuardRequest(op: .armMany, seconds: seconds, ids: ids, duties: duties), &channel)
                guard answer == "ok \(ids[0])" else { throw GuardError("the guard refused duties: \(answer)") }
                return ids
            }
        }
        return ids.map(GuardDutyID.init)
    }

    public func disarm(all ids: [GuardDutyID]) async throws {
        guard let first = ids.first else { return }
        try await runBlocking {
            try self.channel.withLock { channel in
                let answer = try self.exchange(GuardRequest(op: .disarmMany, ids: ids.map(\.rawValue)), &channel)
                guard answer == "ok \(first.rawValue)" else { throw GuardError("the guard did not confirm disarming: \(answer)") }
            }
        }
    }

    public func disarm(_ id: GuardDutyID) async throws {
        try await runBlocking {
            try self.channel.withLock { channel in
                let answer = try self.exchange(GuardRequest(op: .disarm, id: id.rawValue), &channel)
                guard answer == "ok \(id.rawValue)" else { throw GuardError("the guard did not confirm disarming: \(answer)") }
            }
        }
    }

    public func close() async {
        try? send(GuardRequest(op: .close))
        child.closeStdin()
        let child = self.child
        _ = try? await runBlocking { child.wait() }
    }

    /// Closes the pipe without a `close` request, as the coordinator's death would: the guard
    /// runs every armed duty. (For tests of the guard itself.)
    func abandon() async -> Int32 {
        child.closeStdin()
        let child = self.child
        return (try? await runBlocking { child.wait() }) ?? -1
    }

    /// One request and its answer line. Called with the channel locked.
    private func exchange(_ request: GuardRequest, _ channel: inout Channel) throws -> String {
        try send(request)
        return try channel.reader.next(fd: child.stdoutFD, timeout: .seconds(5))
    }

    private func send(_ request: GuardRequest) throws {
        var data = try JSONEncoder().encode(request)
        data.append(UInt8(ascii: "\n"))
        let fd = child.stdinFD
        let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == data.count else { throw GuardError("the guard is gone (write: \(String(cString: strerror(errno))))") }
    }
}

/// Reads `\n`-terminated lines from a descriptor with a timeout.
struct LineReader: Sendable {
    var buffer: [UInt8] = []

    mutating func next(fd: Int32, timeout: Duration) throws -> String {
        let deadline = ContinuousClock.now + timeout
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                return line
            }
            let left = deadline - .now
            guard left > .zero else { throw GuardError("the guard did not answer within \(formatDuration(timeout))") }
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(left.milliseconds) + 1)
            if ready <= 0 { continue }
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw GuardError("the guard exited unexpectedly") }
            buffer += chunk[0..<n]
        }
    }
}

public struct GuardError: Error, Sendable, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}
