#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import NIOSSL

/// Where a replication peer's certificate, private key and trusted CA live (PEM files).
///
/// Both ends present `certificate` and accept only a peer whose certificate `trustedCA` signed:
/// a DR site and its senders are issued certificates by one CA of their own.
public struct TLSIdentity: Sendable, Hashable {
    /// This peer's certificate (PEM; intermediates may follow the leaf).
    public var certificate: String
    /// The private key of `certificate` (PEM, unencrypted).
    public var privateKey: String
    /// The CA certificate(s) (PEM) that must have signed the other end's certificate.
    public var trustedCA: String

    public init(certificate: String, privateKey: String, trustedCA: String) {
        self.certificate = certificate
        self.privateKey = privateKey
        self.trustedCA = trustedCA
    }
}

/// The loaded PEM files of an identity, each error naming the file and the fix.
struct LoadedIdentity {
    var chain: [NIOSSLCertificate]?
    var key: NIOSSLPrivateKey?
    var trustRoots: [NIOSSLCertificate]

    /// Loads `trustedCA` and, when given, the certificate and key.
    init(trustedCA: String, certificate: String?, privateKey: String?) throws(TLSPipeError) {
        self.trustRoots = try Self.certificates(trustedCA, role: "trusted CA")
        if let certificate, let privateKey {
            self.chain = try Self.certificates(certificate, role: "certificate")
            try Self.checkReadable(privateKey, role: "private key")
            do {
                self.key = try NIOSSLPrivateKey(file: privateKey, format: .pem)
            } catch {
                throw .unusableIdentity(file: privateKey, role: "private key",
                                        reason: "not an unencrypted PEM private key (\(error))")
            }
        }
    }

    private static func certificates(_ path: String, role: String) throws(TLSPipeError) -> [NIOSSLCertificate] {
        try checkReadable(path, role: role)
        let loaded: [NIOSSLCertificate]
        do {
            loaded = try NIOSSLCertificate.fromPEMFile(path)
        } catch {
            throw .unusableIdentity(file: path, role: role, reason: "not a PEM certificate (\(error))")
        }
        guard !loaded.isEmpty else {
            throw .unusableIdentity(file: path, role: role, reason: "holds no PEM certificate")
        }
        return loaded
    }

    private static func checkReadable(_ path: String, role: String) throws(TLSPipeError) {
        guard access(path, R_OK) == 0 else {
            throw .unusableIdentity(file: path, role: role, reason: String(cString: strerror(errno)))
        }
    }

    /// The context for one side; `server` requires and verifies a client certificate.
    func context(server: Bool) throws(TLSPipeError) -> NIOSSLContext {
        var configuration: TLSConfiguration
        let chain = (self.chain ?? []).map { NIOSSLCertificateSource.certificate($0) }
        if server, let key = self.key {
            configuration = .makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
            // Client certificates carry no host name: check the chain only, and require one.
            configuration.certificateVerification = .noHostnameVerification
        } else {
            configuration = .makeClientConfiguration()
            configuration.certificateChain = chain
            configuration.privateKey = self.key.map { .privateKey($0) }
            configuration.certificateVerification = .fullVerification
        }
        configuration.trustRoots = .certificates(self.trustRoots)
        configuration.minimumTLSVersion = .tlsv12
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw .unusableIdentity(file: "", role: "TLS configuration",
                                    reason: "\(error) (check that the private key belongs to the certificate)")
        }
    }
}
