import Foundation
import NIOPosix
import QuiesceTestSupport
@testable import ReplicationTLS
import Testing

/// The mutual-TLS pipe between a sender and `quiesce serve`, on loopback, as an operator checks
/// a new DR link: the right sender gets through with its bytes intact, everybody else is refused.
@Suite(.serialized)
struct TLSPipeTests {
    @Test func authenticatedSendersBytesReachTheHandlerAndItsAnswerComesBack() throws {
        try withTemporaryDirectory { dir in
            let certificates = try TestCertificates.make(in: dir)
            let log = ServerLog()
            // The handler echoes until the sender's EOF, then answers with a trailer: it can only
            // write that trailer if EOF arrived, and the sender only reads to the end if the
            // handler's close arrived as EOF.
            let server = try TLSPipeServer.start(host: "127.0.0.1", port: 0, identity: certificates.server,
                                                 onRefused: log.refused) { fd, peer in
                log.handlerStarted(peer: "\(peer)", thread: MultiThreadedEventLoopGroup.currentEventLoop == nil ? "own thread" : "event loop")
                var received = 0
                var buffer = [UInt8](repeating: 0, count: 64 * 1024)
                while true {
                    let count = read(fd, &buffer, buffer.count)
                    guard count > 0 else { break }
                    received += count
                    guard writeAll(fd, buffer[0..<count]) else { break }
                }
                _ = writeAll(fd, Array("served \(received) bytes\n".utf8)[...])
                close(fd)
                log.handlerFinished(received: received)
            }
            defer { server.shutdown() }

            let fd = try TLSPipeClient.connect(host: "127.0.0.1", port: server.port, identity: certificates.client)
            defer { close(fd) }
            let payload = randomBytes(count: 4 << 20)
            let sent = DispatchSemaphore(value: 0)
            let writer = Thread {
                _ = writeAll(fd, payload[...])
                shutdown(fd, CInt(SHUT_WR))
                sent.signal()
            }
            writer.start()
            let answer = readToEOF(fd)
            #expect(sent.wait(timeout: .now() + 60) == .success, "the sender's writes did not finish")

            let trailer = Array("served \(payload.count) bytes\n".utf8)
            #expect(answer.count == payload.count + trailer.count)
            #expect(answer.prefix(payload.count).elementsEqual(payload), "the echo differs from what was sent")
            #expect(answer.suffix(trailer.count).elementsEqual(trailer),
                    "trailer: \(String(decoding: answer.suffix(trailer.count), as: UTF8.self))")

            #expect(log.waitUntil(within: 10) { $0.finished.count == 1 })
            let state = log.state
            #expect(state.finished == [payload.count])
            #expect(state.peers.count == 1)
            #expect(state.peers.first?.hasPrefix("127.0.0.1:") == true)
            #expect(state.peers.first?.hasSuffix("(CN=quiesce-test-sender)") == true, "\(state.peers)")
            // Thread names are unreliable on Linux Foundation; what matters is that the blocking
            // handler never runs on a NIO event loop.
            #expect(state.threads == ["own thread"], "handler ran on \(state.threads)")
            #expect(state.refusals.isEmpty, "\(state.refusals)")
        }
    }

    @Test func senderWithoutACertificateIsRefusedAndNeverReachesTheHandler() throws {
        try withTemporaryDirectory { dir in
            let certificates = try TestCertificates.make(in: dir)
            try expectRefused(certificates, reasonMentions: "no certificate") { port in
                try TLSPipeClient.connect(host: "127.0.0.1", port: port, trustedCA: certificates.ca,
                                          certificate: nil, privateKey: nil)
            }
        }
    }

    @Test func senderWithACertificateFromAnotherCAIsRefusedAndNeverReachesTheHandler() throws {
        try withTemporaryDirectory { dir in
            let certificates = try TestCertificates.make(in: dir)
            let rogue = TLSIdentity(certificate: certificates.rogueClientCert, privateKey: certificates.rogueClientKey,
                                    trustedCA: certificates.ca)
            try expectRefused(certificates, reasonMentions: "certificate verify failed") { port in
                try TLSPipeClient.connect(host: "127.0.0.1", port: port, identity: rogue)
            }
        }
    }

    @Test func senderThatDoesNotTrustTheServersCARefusesTheServer() throws {
        try withTemporaryDirectory { dir in
            let certificates = try TestCertificates.make(in: dir)
            let log = ServerLog()
            let server = try TLSPipeServer.start(host: "127.0.0.1", port: 0, identity: certificates.server,
                                                 onRefused: log.refused) { fd, peer in
                log.handlerStarted(peer: "\(peer)", thread: MultiThreadedEventLoopGroup.currentEventLoop == nil ? "own thread" : "event loop")
                close(fd)
            }
            defer { server.shutdown() }

            let trustsAnotherCA = TLSIdentity(certificate: certificates.clientCert, privateKey: certificates.clientKey,
                                              trustedCA: certificates.rogueCA)
            let error = #expect(throws: TLSPipeError.self) {
                try TLSPipeClient.connect(host: "127.0.0.1", port: server.port, identity: trustsAnotherCA)
            }
            let message = error.map { "\($0)" } ?? ""
            #expect(message.contains("127.0.0.1:\(server.port)"), "\(message)")
            #expect(message.contains("certificate verify failed"), "\(message)")
            #expect(message.contains(certificates.rogueCA), "\(message)")

            #expect(log.waitUntil(within: 10) { $0.refusals.count == 1 })
            #expect(log.state.peers.isEmpty, "the handler ran for \(log.state.peers)")
        }
    }

    @Test func senderChecksTheServersNameAndGetsThroughOnlyWithTheNameInItsCertificate() throws {
        try withTemporaryDirectory { dir in
            let certificates = try TestCertificates.make(in: dir)
            let named = TLSIdentity(certificate: certificates.namedServerCert, privateKey: certificates.namedServerKey,
                                    trustedCA: certificates.ca)
            let log = ServerLog()
            let server = try TLSPipeServer.start(host: "127.0.0.1", port: 0, identity: named,
                                                 onRefused: log.refused) { fd, peer in
                log.handlerStarted(peer: "\(peer)", thread: MultiThreadedEventLoopGroup.currentEventLoop == nil ? "own thread" : "event loop")
                log.handlerFinished(received: readToEOF(fd).count)
                close(fd)
            }
            defer { server.shutdown() }

            // By address: the certificate names dr.example.org only. (The client checks the name
            // after its side of the handshake, so under TLS 1.3 the server may see an authenticated
            // client that hangs up at once: its handler reads EOF.)
            let error = #expect(throws: TLSPipeError.self) {
                try TLSPipeClient.connect(host: "127.0.0.1", port: server.port, identity: certificates.client)
            }
            let message = error.map { "\($0)" } ?? ""
            #expect(message.contains("not valid for \"127.0.0.1\""), "\(message)")

            // By the name in the certificate.
            let fd = try TLSPipeClient.connect(host: "127.0.0.1", port: server.port, identity: certificates.client,
                                               serverName: "dr.example.org")
            #expect(writeAll(fd, Array("dr\n".utf8)[...]))
            close(fd)
            #expect(log.waitUntil(within: 10) { $0.finished.contains(3) }, "\(log.state)")
            #expect(log.state.finished.allSatisfy { $0 == 0 || $0 == 3 }, "\(log.state)")
        }
    }

    @Test func senderToAPortNobodyListensOnIsToldTheConnectionWasRefused() throws {
        try withTemporaryDirectory { dir in
            let certificates = try TestCertificates.make(in: dir)
            // A port that was just free: bind it, read it, stop.
            let server = try TLSPipeServer.start(host: "127.0.0.1", port: 0, identity: certificates.server) { fd, _ in
                close(fd)
            }
            let port = server.port
            server.shutdown()
            let error = #expect(throws: TLSPipeError.self) {
                try TLSPipeClient.connect(host: "127.0.0.1", port: port, identity: certificates.client)
            }
            let message = error.map { "\($0)" } ?? ""
            #expect(message.contains("127.0.0.1:\(port)") && message.contains("connection refused"), "\(message)")
        }
    }

    /// Starts a server, runs `connect` against it, and checks that the client is refused: an error
    /// at connect, or EOF / an error on its first exchange (TLS 1.3 checks the client's certificate
    /// after the client's handshake is done), that the handler never ran, and that the server
    /// reported the refusal with `reasonMentions` in it.
    private func expectRefused(_ certificates: TestCertificates, reasonMentions: String,
                               connect: (Int) throws -> Int32) throws {
        let log = ServerLog()
        let server = try TLSPipeServer.start(host: "127.0.0.1", port: 0, identity: certificates.server,
                                             onRefused: log.refused) { fd, peer in
            log.handlerStarted(peer: "\(peer)", thread: MultiThreadedEventLoopGroup.currentEventLoop == nil ? "own thread" : "event loop")
            _ = writeAll(fd, Array("welcome\n".utf8)[...])
            close(fd)
        }
        defer { server.shutdown() }

        do {
            let fd = try connect(server.port)
            defer { close(fd) }
            _ = writeAll(fd, Array("hello\n".utf8)[...])
            var buffer = [UInt8](repeating: 0, count: 64)
            let count = read(fd, &buffer, buffer.count)
            #expect(count <= 0, "the refused client read \(count) bytes: \(String(decoding: buffer.prefix(max(count, 0)), as: UTF8.self))")
        } catch let error as TLSPipeError {
            #expect("\(error)".contains("127.0.0.1:\(server.port)"), "\(error)")
        }

        #expect(log.waitUntil(within: 10) { $0.refusals.count == 1 }, "the server did not report the refusal")
        let state = log.state
        #expect(state.peers.isEmpty, "the handler ran for \(state.peers)")
        #expect(state.refusals.first?.contains(reasonMentions) == true, "\(state.refusals)")
    }
}

extension TestCertificates {
    var server: TLSIdentity { TLSIdentity(certificate: serverCert, privateKey: serverKey, trustedCA: ca) }
    var client: TLSIdentity { TLSIdentity(certificate: clientCert, privateKey: clientKey, trustedCA: ca) }
}

/// What a test server saw: handler runs and refused connections, from any thread.
private final class ServerLog: @unchecked Sendable {
    struct State {
        var peers: [String] = []
        var threads: [String] = []
        var finished: [Int] = []
        var refusals: [String] = []
    }

    private let lock = NSLock()
    private var current = State()

    var state: State { lock.withLock { current } }

    func handlerStarted(peer: String, thread: String) {
        lock.withLock {
            current.peers.append(peer)
            current.threads.append(thread)
        }
    }

    func handlerFinished(received: Int) { lock.withLock { current.finished.append(received) } }

    var refused: @Sendable (String, TLSPipeError) -> Void {
        { [self] _, reason in lock.withLock { current.refusals.append("\(reason)") } }
    }

    /// Polls until `condition` holds or `seconds` pass.
    func waitUntil(within seconds: Double, _ condition: (State) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition(state) { return true }
            usleep(20_000)
        }
        return condition(state)
    }
}

private func writeAll(_ fd: Int32, _ bytes: ArraySlice<UInt8>) -> Bool {
    bytes.withUnsafeBytes { raw in
        var done = 0
        while done < raw.count {
            let count = write(fd, raw.baseAddress! + done, raw.count - done)
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return false }
            done += count
        }
        return true
    }
}

private func readToEOF(_ fd: Int32) -> [UInt8] {
    var result: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 64 * 1024)
    while true {
        let count = read(fd, &buffer, buffer.count)
        if count < 0, errno == EINTR { continue }
        guard count > 0 else { return result }
        result.append(contentsOf: buffer[0..<count])
    }
}

private func randomBytes(count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        for index in stride(from: 0, to: count, by: 8) {
            raw.storeBytes(of: generator.next() as UInt64, toByteOffset: index, as: UInt64.self)
        }
    }
    return bytes
}
