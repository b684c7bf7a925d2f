import Foundation
import QuiesceCore

/// `quiesce.toml`: where the catalog and the writer registry are, the coordinator's limits,
/// and the volumes of the snapshot set.
///
/// ```toml
/// [coordinator]
/// catalog = "/var/lib/quiesce/catalog.db"
/// writers_dir = "/etc/quiesce/writers.d"   # relative: to this file's directory
/// freeze_timeout = "60s"                   # default `timeout` of writers
/// hold_timeout = "10s"                     # FIFREEZE → FITHAW, at most 60 s
///
/// [[volume]]
/// name = "vm1"
/// image = "/datastore/vm1.img"
/// mount = "/srv/vm1"                       # the guest filesystem, flushed and held
/// provider = "reflink"
/// snapshot_dir = "/datastore/.quiesce/vm1"
/// ```
public struct Configuration: Sendable {
    public static let defaultPath = "/etc/quiesce/quiesce.toml"
    public static let defaultCatalog = "/var/lib/quiesce/catalog.db"
    public static let defaultWritersDirectory = "/etc/quiesce/writers.d"
    public static let defaultFreezeTimeout: Duration = .seconds(60)
    public static let defaultHoldTimeout: Duration = .seconds(10)
    /// The hold blocks every application's I/O on the held filesystems: never longer than this.
    public static let maximumHoldTimeout: Duration = .seconds(60)

    public var file: String
    /// `[coordinator] catalog`: the checkpoint catalog (SQLite), outside every guest mount.
    public var catalog: String
    /// `[coordinator] writers_dir`, absolute (a relative setting is resolved against the config file's directory).
    public var writersDirectory: String
    /// `[coordinator] freeze_timeout`: the default `timeout` of writers.
    public var freezeTimeout: Duration
    /// `[coordinator] hold_timeout`: the limit of the hold window, enforced by the watchdog.
    public var holdTimeout: Duration
    /// `[[volume]]`: the snapshot set, in the order written.
    public var volumes: [Volume]
    /// `[[target]]`: DR destinations, in the order written.
    public var targets: [ReplicationTarget] = []

    public init(file: String, catalog: String = Configuration.defaultCatalog,
                writersDirectory: String = Configuration.defaultWritersDirectory,
                freezeTimeout: Duration = Configuration.defaultFreezeTimeout,
                holdTimeout: Duration = Configuration.defaultHoldTimeout, volumes: [Volume]) {
        self.file = file
        self.catalog = catalog
        self.writersDirectory = writersDirectory
        self.freezeTimeout = freezeTimeout
        self.holdTimeout = holdTimeout
        self.volumes = volumes
    }

    /// Reads and validates the file at `path`. Throws `ConfigError`.
    public static func load(path: String) throws -> Configuration {
        let text: String
        do {
            text = try readTextFile(path)
        } catch {
            throw ConfigError(file: path, "cannot read the configuration: \(error.reason)"
                + " (pass --config PATH to use another file)")
        }
        return try parse(text, file: path)
    }

    /// Parses and validates a configuration; `file` names it in errors and anchors a relative `writers_dir`.
    public static func parse(_ text: String, file: String) throws -> Configuration {
        let root = try TOMLParser.parse(text, file: file)
        var config = Configuration(file: file, volumes: [])
        var volumesLine: Int?

        for key in root.keys {
            let entry = root[key]!
            switch key {
            case "coordinator":
                guard case .table(let table) = entry.value else {
                    throw ConfigError(file: file, line: entry.line, key: key,
                                      "expected the table [coordinator], found \(entry.value.typeName)")
                }
                try config.readCoordinator(Section(file: file, table: table, name: "[coordinator]"))
            case "volume":
                volumesLine = entry.line
                config.volumes = try volumeTables(entry, file: file).map {
                    try readVolume(Section(file: file, table: $0, name: "[[volume]]"))
                }
            case "target":
                config.targets = try arrayOfTables(entry, key: "target", file: file).map {
                    try ReplicationTarget.read(Section(file: file, table: $0, name: "[[target]]"))
                }
                for (k, target) in config.targets.enumerated() where config.targets[..<k].contains(where: { $0.name == target.name }) {
                    throw ConfigError(file: file, line: entry.line, key: "target", "two targets are named \"\(target.name)\"")
                }
            default:
                throw unknownTopLevel(key, entry, file: file)
            }
        }
        guard !config.volumes.isEmpty else {
            throw ConfigError(file: file, line: volumesLine, key: volumesLine == nil ? nil : "volume",
                              "no volume is configured: add a [[volume]] table with name, image and mount")
        }
        try config.checkVolumesAreDistinct(root)
        try config.checkNothingOfOursIsFrozen(root)
        return config
    }

    // MARK: [coordinator]

    static let coordinatorKeys = ["catalog", "writers_dir", "freeze_timeout", "hold_timeout"]

    private mutating func readCoordinator(_ section: Section) throws {
        try section.refuseUnknownKeys(Self.coordinatorKeys)
        if let catalog = try section.absolutePath("catalog") { self.catalog = catalog }
        if let directory = try section.string("writers_dir") {
            if directory.hasPrefix("/") {
                writersDirectory = normalizedPath(directory)
            } else {
                var base = (file as NSString).deletingLastPathComponent
                if !base.hasPrefix("/") { base = FileManager.default.currentDirectoryPath + "/" + base }
                writersDirectory = normalizedPath(base + "/" + directory)
            }
        }
        if let timeout = try section.duration("freeze_timeout") {
            guard timeout > .zero else { throw section.error("freeze_timeout", "must be more than 0") }
            freezeTimeout = timeout
        }
        if let hold = try section.duration("hold_timeout") {
            guard hold > .zero, hold <= Self.maximumHoldTimeout else {
                throw section.error("hold_timeout", "must be more than 0 and at most \(formatDuration(Self.maximumHoldTimeout))"
                    + " because the hold blocks applications' I/O, found \(formatDuration(hold))")
            }
            holdTimeout = hold
        }
    }

    // MARK: [[volume]]

    static let volumeKeys = ["name", "image", "mount", "provider", "snapshot_dir"]

    private static func volumeTables(_ entry: TOMLTable.Entry, file: String) throws -> [TOMLTable] {
        try arrayOfTables(entry, key: "volume", file: file)
    }

    private static func arrayOfTables(_ entry: TOMLTable.Entry, key: String, file: String) throws -> [TOMLTable] {
        let wrongShape = { (found: String) in
            ConfigError(file: file, line: entry.line, key: key,
                        "expected an array of tables written [[\(key)]], found \(found)")
        }
        switch entry.value {
        case .table: throw wrongShape("the table [\(key)] (write [[\(key)]], with two brackets)")
        case .array(let items):
            return try items.map {
                guard case .table(let table) = $0 else { throw wrongShape("\($0.typeName) in the array") }
                return table
            }
        default: throw wrongShape(entry.value.typeName)
        }
    }

    private static func readVolume(_ section: Section) throws -> Volume {
        try section.refuseUnknownKeys(volumeKeys)
        let name = try section.required(section.string("name"), "name")
        guard isValidName(name) else { throw section.error("name", invalidNameReason(name)) }
        let image = try section.required(section.absolutePath("image"), "image")
        let provider = try section.string("provider") ?? "reflink"
        guard isValidName(provider) else { throw section.error("provider", invalidNameReason(provider)) }
        return Volume(name: name, image: image, mount: try section.absolutePath("mount"),
                      provider: provider, snapshotDirectory: try section.absolutePath("snapshot_dir"))
    }

    /// Two volumes with one name, image or mount would snapshot or hold something twice.
    private func checkVolumesAreDistinct(_ root: TOMLTable) throws {
        let tables = Self.volumeTablesForLines(root)
        for (k, volume) in volumes.enumerated() {
            for (j, earlier) in volumes[..<k].enumerated() {
                let place = "the volume on line \(tables[j].line)"
                let line = { (key: String) in tables[k][key]?.line ?? tables[k].line }
                if volume.name == earlier.name {
                    throw ConfigError(file: file, line: line("name"), key: "name",
                                      "volume name \"\(volume.name)\" is already used by \(place)")
                }
                if volume.image == earlier.image {
                    throw ConfigError(file: file, line: line("image"), key: "image",
                                      "image \(volume.image) is already in volume \"\(earlier.name)\" (\(place))")
                }
                if let mount = volume.mount, mount == earlier.mount {
                    throw ConfigError(file: file, line: line("mount"), key: "mount",
                                      "mount \(mount) is already the mount of volume \"\(earlier.name)\" (\(place))")
                }
            }
        }
    }

    private static func volumeTablesForLines(_ root: TOMLTable) -> [TOMLTable] {
        guard case .array(let items)? = root["volume"]?.value else { return [] }
        return items.compactMap { if case .table(let table) = $0 { table } else { nil } }
    }

    /// The catalog and the registry must stay writable during the hold, and the snapshots must not
    /// be written into a filesystem being snapshotted: none may live on a volume's guest filesystem.
    private func checkNothingOfOursIsFrozen(_ root: TOMLTable) throws {
        let coordinator: TOMLTable? = if case .table(let t)? = root["coordinator"]?.value { t } else { nil }
        let tables = Self.volumeTablesForLines(root)
        var ours: [(key: String, path: String, line: Int?, what: String)] = [
            ("catalog", catalog, coordinator?["catalog"]?.line, "the catalog is written while filesystems are held"),
            ("writers_dir", writersDirectory, coordinator?["writers_dir"]?.line, "the writer registry is read while filesystems are held"),
        ]
        for (k, volume) in volumes.enumerated() {
            let why = "a snapshot cannot be taken into a filesystem that is being held"
            ours.append(("image", volume.image, tables[k]["image"]?.line, why))
            ours.append(("snapshot_dir", volume.snapshotDirectory, tables[k]["snapshot_dir"]?.line ?? tables[k].line, why))
        }
        for item in ours {
            for volume in volumes {
                guard let mount = volume.mount else { continue }
                let lexically = isPath(item.path, inside: mount)
                guard lexically || isOnMountedFilesystem(item.path, mount: mount) else { continue }
                let how = lexically ? "is inside" : "is on the same filesystem as"
                throw ConfigError(file: file, line: item.line, key: item.key,
                                  "\(item.path) \(how) the guest mount \(mount) of volume \"\(volume.name)\", which gets frozen"
                                      + " (\(item.what)): move it to the host's own filesystem")
            }
        }
    }

    private static func unknownTopLevel(_ key: String, _ entry: TOMLTable.Entry, file: String) -> ConfigError {
        let known = ["coordinator", "volume", "target"]
        let what: String
        var hint = closest(to: key, in: known).map { $0 == "volume" || $0 == "target" ? " (did you mean [[\($0)]]?)" : " (did you mean [\($0)]?)" } ?? ""
        switch entry.value {
        case .table: what = "unknown table [\(key)]"
        case .array(let items) where !items.isEmpty && items.allSatisfy({ if case .table = $0 { true } else { false } }):
            what = "unknown table [[\(key)]]"
        default:
            what = "unknown key at the top level"
            if coordinatorKeys.contains(key) { hint = " (it belongs in the [coordinator] table)" }
            else if volumeKeys.contains(key) { hint = " (it belongs in a [[volume]] table)" }
        }
        if hint.isEmpty { hint = " (known tables: [coordinator], [[volume]], [[target]])" }
        return ConfigError(file: file, line: entry.line, key: key, what + hint)
    }
}

// MARK: - Typed access to one table of the configuration

/// One table of `quiesce.toml`, read with its lines for errors.
struct Section {
    var file: String
    var table: TOMLTable
    /// `[coordinator]`, `[[volume]]`: how errors about a missing key name the table.
    var name: String

    func error(_ key: String, _ reason: String) -> ConfigError {
        ConfigError(file: file, line: table[key]?.line ?? table.line, key: key, reason)
    }

    func refuseUnknownKeys(_ known: [String]) throws {
        for key in table.keys where !known.contains(key) {
            let hint = closest(to: key, in: known).map { " (did you mean \"\($0)\"?)" }
                ?? " (known keys: \(known.joined(separator: ", ")))"
            throw error(key, "unknown key in \(name)\(hint)")
        }
    }

    func required<T>(_ value: T?, _ key: String) throws -> T {
        guard let value else { throw error(key, "missing required key in the \(name) table that starts on this line") }
        return value
    }

    func string(_ key: String) throws -> String? {
        guard let entry = table[key] else { return nil }
        guard case .string(let value) = entry.value else {
            throw error(key, "expected a string, found \(entry.value.typeName)")
        }
        guard !value.isEmpty else { throw error(key, "must not be empty") }
        return value
    }

    func absolutePath(_ key: String) throws -> String? {
        guard let value = try string(key) else { return nil }
        guard value.hasPrefix("/") else {
            throw error(key, "must be an absolute path (it is used from cron and systemd), found \"\(value)\"")
        }
        return normalizedPath(value)
    }

    /// `"60s"`, `"500ms"`, `"2m"`, or a whole number of seconds.
    func duration(_ key: String) throws -> Duration? {
        guard let entry = table[key] else { return nil }
        let expected = "expected a duration like \"60s\", \"500ms\", \"2m\" or a number of seconds"
        switch entry.value {
        case .integer(let seconds):
            guard seconds >= 0 else { throw error(key, "\(expected), found \(seconds)") }
            return .seconds(seconds)
        case .string(let text):
            guard let value = parseDuration(text) else { throw error(key, "\(expected), found \"\(text)\"") }
            return value
        case .float(let seconds) where seconds.isFinite:
            throw error(key, "\(expected), found \(seconds) (write \"\(seconds)s\")")
        default:
            throw error(key, "\(expected), found \(entry.value.typeName)")
        }
    }
}

// MARK: - Helpers shared by the module

/// `[A-Za-z0-9][A-Za-z0-9._-]*`: writer and volume names (they become file names and metric labels).
func isValidName(_ name: String) -> Bool {
    let scalars = Array(name.unicodeScalars)
    func alphanumeric(_ c: Unicode.Scalar) -> Bool {
        ("A"..."Z").contains(c) || ("a"..."z").contains(c) || ("0"..."9").contains(c)
    }
    guard let first = scalars.first, alphanumeric(first) else { return false }
    return scalars.allSatisfy { alphanumeric($0) || $0 == "." || $0 == "_" || $0 == "-" }
}

func invalidNameReason(_ name: String) -> String {
    "expected a name of letters, digits, \".\", \"_\" and \"-\" starting with a letter or digit, found \"\(name)\""
}

/// The known word closest to `key`, if it is close enough to be a typo.
func closest(to key: String, in known: [String]) -> String? {
    let best = known.min { editDistance($0, key) < editDistance($1, key) }
    return best.flatMap { editDistance($0, key) <= max(2, key.count / 3) ? $0 : nil }
}

/// `/a/./b//c/../d/` → `/a/b/d`, lexically (symbolic links are not followed).
func normalizedPath(_ path: String) -> String {
    var parts: [Substring] = []
    for part in path.split(separator: "/") {
        switch part {
        case ".": continue
        case "..": _ = parts.popLast()
        default: parts.append(part)
        }
    }
    return "/" + parts.joined(separator: "/")
}

func isPath(_ path: String, inside directory: String) -> Bool {
    let path = normalizedPath(path), directory = normalizedPath(directory)
    return directory == "/" || path == directory || path.hasPrefix(directory + "/")
}

/// Whether `path` (or, if it does not exist yet, its nearest existing parent) is on the
/// filesystem mounted at `mount`. False when nothing is mounted there: an empty mount
/// point is on its parent's filesystem, and that says nothing about the guest.
func isOnMountedFilesystem(_ path: String, mount: String) -> Bool {
    var mountInfo = stat(), parentInfo = stat(), pathInfo = stat()
    guard stat(mount, &mountInfo) == 0, stat(mount + "/..", &parentInfo) == 0 else { return false }
    let isMountPoint = mountInfo.st_dev != parentInfo.st_dev || mountInfo.st_ino == parentInfo.st_ino
    guard isMountPoint else { return false }
    var candidate = path
    while stat(candidate, &pathInfo) != 0 {
        let parent = (candidate as NSString).deletingLastPathComponent
        guard parent != candidate, !parent.isEmpty else { return false }
        candidate = parent
    }
    return pathInfo.st_dev == mountInfo.st_dev
}

/// Why a file could not be read, as `strerror` says it.
struct ReadFailure: Error {
    var reason: String
}

/// The whole file as UTF-8 text.
func readTextFile(_ path: String) throws(ReadFailure) -> String {
    let bytes = try readFileBytes(path)
    guard let text = String(validating: bytes, as: UTF8.self) else {
        throw ReadFailure(reason: "the file is not valid UTF-8 text")
    }
    return text
}

func readFileBytes(_ path: String) throws(ReadFailure) -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw ReadFailure(reason: String(cString: strerror(errno))) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count < 0 {
            if errno == EINTR { continue }
            throw ReadFailure(reason: String(cString: strerror(errno)))
        }
        if count == 0 { return bytes }
        bytes += buffer[..<count]
    }
}
