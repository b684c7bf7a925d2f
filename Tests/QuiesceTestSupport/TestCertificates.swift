import Foundation

/// A throwaway PKI for mutual-TLS tests, made with the `openssl` CLI in a directory the test
/// owns (use `withTemporaryDirectory`): a CA, a server certificate for 127.0.0.1 and "localhost",
/// a second server certificate for "dr.example.org" only, two client certificates from the same CA
/// (CN=quiesce-test-sender and CN=other-primary), and a second, unrelated "rogue" CA with a client certificate of its own. Keys are unencrypted PEM (P-256), certificates valid for two days.
public struct TestCertificates: Sendable {
    /// The CA that issued `serverCert` and `clientCert`.
    public var ca: String
    public var serverCert: String
    public var serverKey: String
    /// A server certificate from `ca` whose only name is "dr.example.org" (no IP address).
    public var namedServerCert: String
    public var namedServerKey: String
    public var clientCert: String
    public var clientKey: String
    /// A second client of the same CA (CN=other-primary): trusted, but another primary.
    public var otherClientCert: String
    public var otherClientKey: String
    /// A CA nobody trusts, and the client certificate it issued.
    public var rogueCA: String
    public var rogueClientCert: String
    public var rogueClientKey: String

    /// Generates the certificates in `dir`. Throws (does not skip) when `openssl` is missing.
    public static func make(in dir: String) throws -> TestCertificates {
        guard let openssl = TestEnvironment.locate("openssl") else {
            throw TestSupportError("openssl not found: the TLS tests make their certificates with it (apt-get install openssl)")
        }
        let tool = OpenSSL(path: openssl, directory: dir)
        let certificates = TestCertificates(
            ca: "\(dir)/ca.pem",
            serverCert: "\(dir)/server.pem", serverKey: "\(dir)/server.key",
            namedServerCert: "\(dir)/named-server.pem", namedServerKey: "\(dir)/named-server.key",
            clientCert: "\(dir)/client.pem", clientKey: "\(dir)/client.key",
            otherClientCert: "\(dir)/other-client.pem", otherClientKey: "\(dir)/other-client.key",
            rogueCA: "\(dir)/rogue-ca.pem",
            rogueClientCert: "\(dir)/rogue-client.pem", rogueClientKey: "\(dir)/rogue-client.key")

        try tool.makeCA(name: "ca", subject: "/CN=quiesce test CA")
        try tool.issue(name: "server", by: "ca", subject: "/CN=127.0.0.1",
                       extensions: "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
        try tool.issue(name: "named-server", by: "ca", subject: "/CN=dr.example.org",
                       extensions: "subjectAltName=DNS:dr.example.org\nextendedKeyUsage=serverAuth")
        try tool.issue(name: "client", by: "ca", subject: "/CN=quiesce-test-sender",
                       extensions: "extendedKeyUsage=clientAuth")
        try tool.issue(name: "other-client", by: "ca", subject: "/CN=other-primary",
                       extensions: "extendedKeyUsage=clientAuth")
        try tool.makeCA(name: "rogue-ca", subject: "/CN=rogue test CA")
        try tool.issue(name: "rogue-client", by: "rogue-ca", subject: "/CN=rogue-sender",
                       extensions: "extendedKeyUsage=clientAuth")
        return certificates
    }
}

/// The `openssl` invocations, each failure naming the command and its stderr.
private struct OpenSSL {
    var path: String
    var directory: String

    private static let keyOptions = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    func makeCA(name: String, subject: String) throws {
        try run(["req", "-x509"] + Self.keyOptions + [
            "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).pem",
            "-days", "2", "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    func issue(name: String, by ca: String, subject: String, extensions: String) throws {
        let extfile = "\(directory)/\(name).ext"
        try (extensions + "\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
            .write(toFile: extfile, atomically: true, encoding: .utf8)
        try run(["req", "-new"] + Self.keyOptions + [
            "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).csr", "-subj", subject,
        ])
        try run([
            "x509", "-req", "-in", "\(directory)/\(name).csr",
            "-CA", "\(directory)/\(ca).pem", "-CAkey", "\(directory)/\(ca).key",
            "-set_serial", "0x" + String(UInt64.random(in: 1...UInt64(Int64.max)), radix: 16),
            "-days", "2", "-extfile", extfile, "-out", "\(directory)/\(name).pem",
        ])
    }

    private func run(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        let stderr = Pipe()
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let message = stderr.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw TestSupportError("openssl \(arguments.joined(separator: " ")) exited \(process.terminationStatus): "
                                   + String(decoding: message, as: UTF8.self))
        }
    }
}
