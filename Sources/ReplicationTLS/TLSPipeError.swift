#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import NIOPosix
import NIOSSL

/// Why a mutual-TLS pipe could not be set up; each description names the endpoint or file, the
/// cause, and the fix.
public enum TLSPipeError: Error, Sendable, CustomStringConvertible {
    /// A PEM file of the identity cannot be read or used.
    case unusableIdentity(file: String, role: String, reason: String)
    /// `quiesce serve` cannot listen on `address` (host:port).
    case cannotListen(address: String, reason: String)
    /// No TCP connection to `address` (host:port).
    case cannotConnect(address: String, reason: String, fix: String)
    /// The TLS handshake with `address` failed.
    case handshakeFailed(address: String, reason: String, fix: String)
    /// Connecting and the handshake together took longer than `seconds`.
    case timedOut(address: String, seconds: Double)

    public var description: String {
        switch self {
        case let .unusableIdentity(file, role, reason):
            let which = file.isEmpty ? role : "\(role) \(file)"
            return "cannot use the TLS \(which): \(reason)\n"
                + "       (check the path and its permissions: certificates and keys are PEM files, keys unencrypted)"
        case let .cannotListen(address, reason):
            return "cannot listen for TLS connections on \(address): \(reason)\n"
                + "       (choose another address or port, or stop what already listens there)"
        case let .cannotConnect(address, reason, fix):
            return "cannot connect to \(address): \(reason)\n       (\(fix))"
        case let .handshakeFailed(address, reason, fix):
            return "TLS handshake with \(address) failed: \(reason)\n       (\(fix))"
        case let .timedOut(address, seconds):
            return "no TLS connection to \(address) within \(formatted(seconds)) s\n"
                + "       (check that `quiesce serve` runs there and that no firewall drops the port; raise the timeout on slow links)"
        }
    }
}

private func formatted(_ seconds: Double) -> String {
    seconds == seconds.rounded() ? String(Int(seconds)) : String(seconds)
}

extension TLSPipeError {
    /// A failed TCP connect, classified by errno where there is one.
    static func connect(_ error: Error, address: String, timeout: Double) -> TLSPipeError {
        if case ChannelError.connectTimeout = error { return .timedOut(address: address, seconds: timeout) }
        var errnoCode: CInt?
        var text = "\(error)"
        if let io = error as? IOError {
            errnoCode = io.errnoCode
        } else if let nio = error as? NIOConnectionError {
            if let single = nio.connectionErrors.first?.error as? IOError { errnoCode = single.errnoCode }
            if let dns = nio.dnsAError ?? nio.dnsAAAAError, nio.connectionErrors.isEmpty {
                return .cannotConnect(address: address, reason: "cannot resolve the host name (\(dns))",
                                      fix: "check the host name in the target, or use an IP address")
            }
            if let first = nio.connectionErrors.first { text = "\(first.error)" }
        }
        switch errnoCode {
        case ECONNREFUSED?:
            return .cannotConnect(address: address, reason: "connection refused",
                                  fix: "start `quiesce serve` there, or check the port in the target")
        case EHOSTUNREACH?, ENETUNREACH?:
            return .cannotConnect(address: address, reason: "no route to host",
                                  fix: "check the address and the network path to the DR site")
        case ETIMEDOUT?:
            return .timedOut(address: address, seconds: timeout)
        case let code?:
            return .cannotConnect(address: address, reason: String(cString: strerror(code)),
                                  fix: "check the address and that `quiesce serve` runs there")
        case nil:
            return .cannotConnect(address: address, reason: text,
                                  fix: "check the address and that `quiesce serve` runs there")
        }
    }

    /// A failed handshake, from the client's side, classified by the BoringSSL reason.
    static func clientHandshake(_ error: Error, address: String, serverName: String, trustedCA: String) -> TLSPipeError {
        let text = "\(error)"
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname {
            return .handshakeFailed(
                address: address,
                reason: "the server's certificate is not valid for \"\(serverName)\"",
                fix: "connect with a name from the certificate's subjectAltName, or reissue it with \"\(serverName)\"")
        }
        if text.contains("CERTIFICATE_VERIFY_FAILED") {
            return .handshakeFailed(
                address: address,
                reason: "certificate verify failed: the server's certificate is not signed by the CA in \(trustedCA)",
                fix: "trust the CA that issued the DR site's certificate, or check that the address is the DR site's")
        }
        if let reason = Self.refusedCertificateReason(text) {
            return .handshakeFailed(
                address: address,
                reason: "the server refused this client's certificate (\(reason))",
                fix: "present a certificate issued by the CA the server trusts")
        }
        if text.contains("eofDuringHandshake") || text.contains("uncleanShutdown") {
            return .handshakeFailed(
                address: address, reason: "the server closed the connection during the handshake",
                fix: "check the server's log: it may not trust this client's certificate, or the port is not a `quiesce serve` TLS port")
        }
        if text.contains("WRONG_VERSION_NUMBER") || text.contains("HTTP_REQUEST") {
            return .handshakeFailed(address: address, reason: "the peer does not speak TLS",
                                    fix: "check the port: it should be the one `quiesce serve` listens on")
        }
        return .handshakeFailed(address: address, reason: text,
                                fix: "check both ends' certificates and that the port is `quiesce serve`'s")
    }

    /// A connection the server dropped before its handshake completed, from the server's side.
    static func serverHandshake(_ error: Error, peer: String, trustedCA: String) -> TLSPipeError {
        let text = "\(error)"
        let clientFix = "issue the sender a client certificate signed by the CA in \(trustedCA)"
        if text.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") || text.contains("CERTIFICATE_REQUIRED") {
            return .handshakeFailed(address: peer, reason: "the client presented no certificate", fix: clientFix)
        }
        if text.contains("CERTIFICATE_VERIFY_FAILED") {
            return .handshakeFailed(
                address: peer,
                reason: "certificate verify failed: the client's certificate is not signed by the CA in \(trustedCA)",
                fix: clientFix)
        }
        if let alert = Self.refusedCertificateReason(text) {
            return .handshakeFailed(address: peer, reason: "the client refused this server's certificate (\(alert))",
                                    fix: "have the sender trust the CA that issued this server's certificate")
        }
        if error is HandshakeTimedOut {
            return .handshakeFailed(address: peer, reason: "no handshake within the handshake timeout",
                                    fix: "check that the client speaks TLS to this port")
        }
        if text.contains("eofDuringHandshake") || error is ClosedBeforeHandshake {
            return .handshakeFailed(
                address: peer,
                reason: "the client closed the connection during the handshake (it may not trust this server's certificate)",
                fix: "have the sender trust the CA that issued this server's certificate")
        }
        return .handshakeFailed(address: peer, reason: text, fix: clientFix)
    }

    private static func refusedCertificateReason(_ text: String) -> String? {
        for alert in ["TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                      "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"]
        where text.contains(alert) {
            return alert.lowercased()
        }
        return nil
    }
}
