import Foundation
import QuiesceCore

/// The writer registry: one `*.toml` drop-in per writer in `writers.d/`.
///
/// Drop-ins can make the coordinator run commands as root (the `exec` writer), so the
/// directory and every drop-in must be owned by root (or the user running quiesce) and
/// not writable by group or others, as cron and sudo require of their drop-ins.
public struct WriterDirectory: Sendable {
    public var path: String

    public init(path: String) { self.path = path }

    /// Drop-ins are `*.toml`; ignored: names ending in `~`, `.sample`, `.disabled`, containing
    /// `.dpkg-` (dpkg-old, dpkg-dist, dpkg-new, dpkg-tmp), and hidden files.
    public static func isIgnored(fileName: String) -> Bool {
        fileName.hasPrefix(".")
            || fileName.hasSuffix("~")
            || fileName.hasSuffix(".sample")
            || fileName.hasSuffix(".disabled")
            || fileName.contains(".dpkg-")
            || !fileName.hasSuffix(".toml")
    }

    /// Every drop-in, sorted by file name, each parsed on its own: one bad file must not hide the others.
    /// A spec must have `name` ([A-Za-z0-9][A-Za-z0-9._-]*) and `type` strings. Two files defining the
    /// same name: the later file is refused naming the earlier one.
    /// A missing directory is an error entry naming it (not a crash).
    public func load() -> [Result<WriterSpec, ConfigError>] {
        let files: [String]
        do { files = try dropInFiles() } catch { return [.failure(error)] }
        var definedIn: [String: String] = [:]
        return files.map { file in
            do throws(ConfigError) {
                try checkTrusted(file, kind: "writer spec")
                let spec = try Self.readSpec(file: file)
                let name = spec.name!
                if let earlier = definedIn[name] {
                    throw ConfigError(file: file, line: spec.table["name"]?.line, key: "name",
                                      "writer \"\(name)\" is already defined in \(earlier), so this file is ignored"
                                          + " (rename the writer or remove one of the files)")
                }
                definedIn[name] = file
                return .success(spec)
            } catch {
                return .failure(error)
            }
        }
    }

    /// Reads one spec file and checks its `name` and `type` (used by `quiesce writers add FILE`).
    public static func parseSpec(file: String) throws -> WriterSpec {
        try readSpec(file: file)
    }

    /// A drop-in's text from elsewhere (a DR manifest); `origin` names it in errors.
    public static func parseSpec(text: String, origin: String) throws -> WriterSpec {
        try parseSpec(text: text, file: origin)
    }

    static func readSpec(file: String) throws(ConfigError) -> WriterSpec {
        let text: String
        do {
            text = try readTextFile(file)
        } catch {
            throw ConfigError(file: file, "cannot read the writer spec: \(error.reason)")
        }
        return try parseSpec(text: text, file: file)
    }

    static func parseSpec(text: String, file: String) throws(ConfigError) -> WriterSpec {
        let table: TOMLTable
        do {
            table = try TOMLParser.parse(text, file: file)
        } catch let error as ConfigError {
            throw error
        } catch {
            throw ConfigError(file: file, "\(error)")
        }
        for key in ["name", "type"] {
            guard let entry = table[key] else {
                throw ConfigError(file: file, key: key, "missing required key: every writer spec needs name and type strings")
            }
            guard case .string(let value) = entry.value, !value.isEmpty else {
                let found = if case .string = entry.value { "an empty string" } else { entry.value.typeName }
                throw ConfigError(file: file, line: entry.line, key: key, "expected a non-empty string, found \(found)")
            }
            if key == "name", !isValidName(value) {
                throw ConfigError(file: file, line: entry.line, key: key, invalidNameReason(value))
            }
        }
        return WriterSpec(file: file, table: table, text: text)
    }

    /// Validates with `validate`, then installs atomically (temp file in the directory, fsync, rename,
    /// fsync dir) as `<dir>/<name>.toml` with mode 0600. Refuses a name that another file already
    /// defines. Returns the installed path.
    ///
    /// The bytes installed are the bytes validated: the source is read once.
    public func install(from source: String, validate: (WriterSpec) throws -> Void) throws -> String {
        let bytes: [UInt8]
        do {
            bytes = try readFileBytes(source)
        } catch {
            throw ConfigError(file: source, "cannot read the writer spec: \(error.reason)")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigError(file: source, "cannot read the writer spec: the file is not valid UTF-8 text")
        }
        let spec = try Self.parseSpec(text: text, file: source)
        let name = spec.name!
        let nameLine = spec.table["name"]?.line
        let target = child("\(name).toml")

        for file in try dropInFiles() {
            if let other = try? Self.parseSpec(file: file) {
                guard other.name != name else {
                    throw ConfigError(file: source, line: nameLine, key: "name",
                                      "writer \"\(name)\" is already registered in \(file)"
                                          + " (remove it first with `quiesce writers remove \(name)`)")
                }
            } else if file == target {
                throw ConfigError(file: source, line: nameLine, key: "name",
                                  "cannot install as \(target): that file exists and does not parse (fix or remove it first)")
            }
        }
        try validate(spec)
        try writeNew(bytes, to: target)
        return target
    }

    /// Removes the file that defines `name`; error naming the directory if none does. Returns the removed path.
    /// A drop-in that does not parse is removed by its file name, `<name>.toml`.
    public func remove(name: String) throws -> String {
        let files = try dropInFiles()
        let defining = files.filter { (try? Self.parseSpec(file: $0))?.name == name }
        guard defining.count <= 1 else {
            throw ConfigError(file: path, "writer \"\(name)\" is defined by several files: "
                + defining.joined(separator: ", ") + " (remove the one you mean by hand)")
        }
        guard let file = defining.first ?? files.first(where: { $0 == child("\(name).toml") }) else {
            throw ConfigError(file: path, "no writer named \"\(name)\" is registered in this directory"
                + " (`quiesce writers list` shows the registered ones)")
        }
        guard unlink(file) == 0 else {
            throw ConfigError(file: file, "cannot remove the writer spec: \(String(cString: strerror(errno)))")
        }
        try syncDirectory()
        return file
    }

    // MARK: Files

    private func child(_ name: String) -> String {
        (path as NSString).appendingPathComponent(name)
    }

    /// The drop-ins' paths, sorted by file name (bytewise, like run-parts).
    private func dropInFiles() throws(ConfigError) -> [String] {
        var info = stat()
        guard stat(path, &info) == 0 else {
            let reason = errno == ENOENT ? "the writers directory does not exist" : String(cString: strerror(errno))
            throw ConfigError(file: path, "\(reason) (create it with `mkdir -p \(path)`, or set writers_dir in [coordinator])")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw ConfigError(file: path, "the writers directory is not a directory (set writers_dir in [coordinator])")
        }
        try checkTrusted(path, kind: "writers directory")
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: path)
        } catch {
            throw ConfigError(file: path, "cannot list the writers directory: \(error.localizedDescription)")
        }
        return names
            .filter { !Self.isIgnored(fileName: $0) }
            .sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
            .map(child(_:))
    }

    /// Refuses what someone other than root (or us) could change: it would run as root.
    private func checkTrusted(_ file: String, kind: String) throws(ConfigError) {
        var info = stat()
        guard stat(file, &info) == 0 else {
            throw ConfigError(file: file, "cannot read the \(kind): \(String(cString: strerror(errno)))")
        }
        if info.st_mode & 0o022 != 0 {
            throw ConfigError(file: file, "the \(kind) is writable by group or others (mode \(String(info.st_mode & 0o7777, radix: 8)))"
                + " and writers can run commands as root: run `chmod go-w \(file)`")
        }
        if info.st_uid != 0, info.st_uid != geteuid() {
            throw ConfigError(file: file, "the \(kind) is owned by uid \(info.st_uid), not root,"
                + " and writers can run commands as root: run `chown root \(file)`")
        }
    }

    /// Writes a new file atomically: a hidden temp file (ignored by `load`) made durable, then
    /// linked into place, which fails rather than replace an existing file.
    private func writeNew(_ bytes: [UInt8], to target: String) throws {
        let failure = { (what: String, code: Int32) in
            ConfigError(file: target, "cannot install the writer spec: \(what): \(String(cString: strerror(code)))")
        }
        var template = Array(child(".\((target as NSString).lastPathComponent).XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw failure("creating a temporary file in \(path)", errno) }
        let temporary = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        defer { unlink(temporary) }
        do {
            defer { close(fd) }
            guard fchmod(fd, 0o600) == 0 else { throw failure("chmod", errno) }
            var written = 0
            while written < bytes.count {
                let count = bytes[written...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                if count < 0, errno == EINTR { continue }
                guard count > 0 else { throw failure("write", errno) }
                written += count
            }
            guard fsync(fd) == 0 else { throw failure("fsync", errno) }
        }
        if link(temporary, target) != 0 {
            if errno == EEXIST {
                throw ConfigError(file: target, "cannot install the writer spec: the file already exists (remove it first)")
            }
            // A filesystem without hard links: no atomic "create only", so check first.
            guard errno == EPERM || errno == EOPNOTSUPP, access(target, F_OK) != 0, rename(temporary, target) == 0 else {
                throw failure("linking into place", errno)
            }
        }
        try syncDirectory()
    }

    private func syncDirectory() throws(ConfigError) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw ConfigError(file: path, "cannot open the writers directory: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw ConfigError(file: path, "cannot fsync the writers directory: \(String(cString: strerror(errno)))") }
    }
}

extension WriterSpec {
    /// The spec's `name`, if it is a string.
    public var name: String? {
        if case .string(let value)? = table["name"]?.value { value } else { nil }
    }

    /// The spec's `type`, if it is a string.
    public var type: String? {
        if case .string(let value)? = table["type"]?.value { value } else { nil }
    }
}

/// Reads `name`, `type`, `order` (default 0) and `timeout` (default `defaultTimeout`) from a spec.
public func readCommonSettings(_ reader: SpecReader, defaultTimeout: Duration) throws -> CommonWriterSettings {
    let name = try reader.string("name")
    guard isValidName(name) else { throw reader.error("name", invalidNameReason(name)) }
    let type = try reader.string("type")
    let order = try reader.int("order", default: 0)
    let timeout = try reader.duration("timeout", default: defaultTimeout)
    guard timeout > .zero else { throw reader.error("timeout", "must be more than 0") }
    return CommonWriterSettings(name: name, type: type, order: order, timeout: timeout, specFile: reader.file)
}
