import Foundation
import QuiesceCore

/// A DR destination (`[[target]]`): where deltas go, how, and at what pace.
///
/// ```toml
/// [[target]]
/// name = "dr1"
/// url = "file:///mnt/dr-store"                 # a DR store on a mounted path
/// # url = "ssh://dr-host/var/lib/quiesce/dr"   # `quiesce receive` over the system's ssh
/// # url = "quiesce://dr-host:7420"             # `quiesce serve`, mutual TLS
/// compress = "zstd"                            # or "none" (default)
/// bandwidth_limit = "50MiB/s"
/// keep = 7                                     # checkpoints the DR store keeps per volume
/// timeout = "2m"                               # give up on a target that takes no bytes and says nothing this long
/// ```
public struct ReplicationTarget: Sendable, Equatable {
    public enum Transport: Sendable, Equatable {
        /// A DR store on a path of this host (a mounted DR filesystem).
        case file(path: String)
        /// `ssh [user@]host [-p port] <remote_command> receive --session --store path`.
        case ssh(user: String?, host: String, port: Int?, path: String)
        /// `quiesce serve` on host:port, mutual TLS.
        case tls(host: String, port: Int)
    }

    /// Client certificate, key and the CA that signed the server's certificate (PEM files).
    public struct TLSFiles: Sendable, Equatable {
        public var certificate: String
        public var privateKey: String
        public var trustedCA: String
        public var serverName: String?
    }

    public var name: String
    public var url: String
    public var transport: Transport
    /// zstd level for data frames; nil sends them as they are.
    public var compressionLevel: Int32?
    public var bytesPerSecond: UInt64?
    public var keep: Int
    /// Extra arguments for ssh (identity file, port, known hosts …).
    public var sshOptions: [String]
    /// The quiesce executable on the ssh host.
    public var remoteCommand: String
    public var tls: TLSFiles?
    /// The receiver verifies each checkpoint it applies (`receive --verify`); for `quiesce://`
    /// targets the server decides (`serve --verify`).
    public var verify = false
    /// How long a send waits for the target to take bytes or answer (it answers slow work,
    /// like a verify, with keepalives) before giving up on it: a hung receiver never hangs
    /// `replicate`, or the other targets it sends to at once.
    public var timeout: Duration = ReplicationTarget.defaultTimeout

    public static let defaultKeep = 7
    public static let defaultPort = 7420
    public static let defaultTimeout: Duration = .seconds(120)

    public init(name: String, url: String, transport: Transport, compressionLevel: Int32? = nil, bytesPerSecond: UInt64? = nil,
                keep: Int = ReplicationTarget.defaultKeep, sshOptions: [String] = [], remoteCommand: String = "quiesce",
                tls: TLSFiles? = nil) {
        self.name = name
        self.url = url
        self.transport = transport
        self.compressionLevel = compressionLevel
        self.bytesPerSecond = bytesPerSecond
        self.keep = keep
        self.sshOptions = sshOptions
        self.remoteCommand = remoteCommand
        self.tls = tls
    }

    static let keys = ["name", "url", "compress", "compress_level", "bandwidth_limit", "keep", "ssh_options", "remote_command",
                       "cert", "key", "ca", "server_name", "verify", "timeout"]

    static func read(_ section: Section) throws -> ReplicationTarget {
        try section.refuseUnknownKeys(keys)
        let name = try section.required(section.string("name"), "name")
        guard isValidName(name) else { throw section.error("name", invalidNameReason(name)) }
        let url = try section.required(section.string("url"), "url")
        let transport: Transport
        do { transport = try parseURL(url) } catch let reason as URLProblem { throw section.error("url", reason.text) }
        var target = ReplicationTarget(name: name, url: url, transport: transport)

        switch try section.string("compress") ?? "none" {
        case "none": target.compressionLevel = nil
        case "zstd": target.compressionLevel = 1
        case let other: throw section.error("compress", "expected \"zstd\" or \"none\", found \"\(other)\"")
        }
        if let level = try section.integer("compress_level") {
            guard (1...19).contains(level) else { throw section.error("compress_level", "expected 1…19 (zstd levels), found \(level)") }
            guard target.compressionLevel != nil else { throw section.error("compress_level", "set compress = \"zstd\" too") }
            target.compressionLevel = Int32(level)
        }
        if let limit = try section.string("bandwidth_limit") {
            guard let rate = parseRate(limit) else {
                throw section.error("bandwidth_limit", "expected a rate like \"50MiB/s\", \"10MB/s\" or \"800KiB/s\", found \"\(limit)\"")
            }
            target.bytesPerSecond = rate
        }
        if let keep = try section.integer("keep") {
            guard keep >= 1 else { throw section.error("keep", "must be at least 1 (the DR copy itself), found \(keep)") }
            target.keep = Int(keep)
        }
        if let timeout = try section.duration("timeout") {
            guard timeout >= .seconds(1) else {
                throw section.error("timeout", "must be at least 1 s, found \(formatDuration(timeout))")
            }
            target.timeout = timeout
        }
        if let verify = try section.boolean("verify") {
            if case .tls = transport {
                throw section.error("verify", "a quiesce:// target verifies when its server runs `quiesce serve --verify`")
            }
            target.verify = verify
        }
        if let options = try section.stringArray("ssh_options") {
            guard case .ssh = transport else { throw section.error("ssh_options", "only for ssh:// targets") }
            target.sshOptions = options
        }
        if let command = try section.string("remote_command") {
            guard case .ssh = transport else { throw section.error("remote_command", "only for ssh:// targets") }
            target.remoteCommand = command
        }
        let certificate = try section.absolutePath("cert"), key = try section.absolutePath("key"), ca = try section.absolutePath("ca")
        let serverName = try section.string("server_name")
        if case .tls = transport {
            target.tls = TLSFiles(certificate: try section.required(certificate, "cert"), privateKey: try section.required(key, "key"),
                                  trustedCA: try section.required(ca, "ca"), serverName: serverName)
        } else if let stray = [("cert", certificate), ("key", key), ("ca", ca), ("server_name", serverName)].first(where: { $0.1 != nil }) {
            throw section.error(stray.0, "only for quiesce:// targets (TLS)")
        }
        return target
    }

    struct URLProblem: Error { var text: String }

    /// `file:///path`, `ssh://[user@]host[:port]/path`, `quiesce://host[:port]`.
    static func parseURL(_ url: String) throws -> Transport {
        guard let components = URLComponents(string: url), let scheme = components.scheme else {
            throw URLProblem(text: "not a URL: \"\(url)\" (expected file:///path, ssh://host/path or quiesce://host:port)")
        }
        switch scheme {
        case "file":
            guard (components.host ?? "").isEmpty, components.path.hasPrefix("/"), components.path.count > 1 else {
                throw URLProblem(text: "a file URL needs an absolute path: file:///mnt/dr-store, found \"\(url)\"")
            }
            return .file(path: normalizedPath(components.path))
        case "ssh":
            guard let host = components.host, !host.isEmpty else { throw URLProblem(text: "an ssh URL needs a host: ssh://dr-host/path") }
            guard components.path.hasPrefix("/"), components.path.count > 1 else {
                throw URLProblem(text: "an ssh URL needs the store's absolute path on the host: ssh://\(host)/var/lib/quiesce/dr")
            }
            return .ssh(user: components.user, host: host, port: components.port, path: components.path)
        case "quiesce":
            guard let host = components.host, !host.isEmpty else { throw URLProblem(text: "a quiesce URL needs a host: quiesce://dr-host:7420") }
            guard components.path.isEmpty || components.path == "/" else {
                throw URLProblem(text: "a quiesce URL has no path (the server's --store decides where), found \"\(components.path)\"")
            }
            return .tls(host: host, port: components.port ?? defaultPort)
        default:
            throw URLProblem(text: "unknown scheme \"\(scheme)\" (expected file, ssh or quiesce)")
        }
    }
}

/// `"50MiB/s"`, `"10MB/s"`, `"800KiB/s"`, `"1GiB/s"`, or a number of bytes per second.
public func parseRate(_ text: String) -> UInt64? {
    var number = text.trimmingCharacters(in: .whitespaces)
    if number.hasSuffix("/s") { number.removeLast(2) }
    let units: [(String, Double)] = [("GiB", 1_073_741_824), ("MiB", 1_048_576), ("KiB", 1024), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3),
                                     ("kB", 1e3), ("B", 1)]
    var scale = 1.0
    for (suffix, factor) in units where number.hasSuffix(suffix) {
        number.removeLast(suffix.count)
        scale = factor
        break
    }
    guard let value = Double(number.trimmingCharacters(in: .whitespaces)), value > 0, value.isFinite else { return nil }
    return UInt64(value * scale)
}

extension Section {
    func boolean(_ key: String) throws -> Bool? {
        guard let entry = table[key] else { return nil }
        guard case .boolean(let value) = entry.value else { throw error(key, "expected true or false, found \(entry.value.typeName)") }
        return value
    }

    func integer(_ key: String) throws -> Int64? {
        guard let entry = table[key] else { return nil }
        guard case .integer(let value) = entry.value else { throw error(key, "expected an integer, found \(entry.value.typeName)") }
        return value
    }

    func stringArray(_ key: String) throws -> [String]? {
        guard let entry = table[key] else { return nil }
        guard case .array(let items) = entry.value else { throw error(key, "expected an array of strings, found \(entry.value.typeName)") }
        return try items.map {
            guard case .string(let text) = $0 else { throw error(key, "expected an array of strings, found \($0.typeName) in it") }
            return text
        }
    }
}
