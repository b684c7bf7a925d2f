import QuiesceCore

/// A bad configuration or writer spec: the file, the line and key when known, the reason.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var line: Int?
    public var key: String?
    public var reason: String

    public init(file: String, line: Int? = nil, key: String? = nil, _ reason: String) {
        self.file = file
        self.line = line
        self.key = key
        self.reason = reason
    }

    /// `/etc/quiesce/writers.d/app.toml:3: key "timeout": expected a duration like "30s", found "soon"`
    public var description: String {
        var place = file
        if let line { place += ":\(line)" }
        let subject = key.map { "key \"\($0)\": " } ?? ""
        return "\(place): \(subject)\(reason)"
    }
}

/// One writer's spec: a `writers.d/*.toml` file, parsed.
public struct WriterSpec: Sendable {
    public var file: String
    public var table: TOMLTable
    /// The bytes `table` was parsed from: what a checkpoint records as the writer's drop-in.
    public var text: String
    public init(file: String, table: TOMLTable, text: String = "") {
        self.file = file
        self.table = table
        self.text = text
    }
}

/// Settings every writer has, read by the registry before the type's factory runs.
public struct CommonWriterSettings: Sendable {
    public var name: String
    public var type: String
    public var order: Int
    public var timeout: Duration
    public var specFile: String
    public init(name: String, type: String, order: Int, timeout: Duration, specFile: String) {
        self.name = name
        self.type = type
        self.order = order
        self.timeout = timeout
        self.specFile = specFile
    }
}

/// Builds a writer of one `type` from its spec. One per writer folder.
public protocol WriterFactory: Sendable {
    /// The spec's `type`.
    var type: String { get }
    /// Read the type's own keys (every key must be consumed, or the spec is refused as unknown)
    /// and build the writer. Must not contact the application: that is `identify`'s job.
    func make(_ spec: SpecReader, common: CommonWriterSettings) throws -> any Writer
}

/// Typed, line-aware access to a spec's keys. Remembers which keys were read so that
/// `finish()` can refuse unknown ones (a typo must not silently disable a setting).
public final class SpecReader {
    public let spec: WriterSpec
    private var consumed: Set<String> = []

    public init(_ spec: WriterSpec) { self.spec = spec }

    public var file: String { spec.file }

    public func error(_ key: String?, _ reason: String) -> ConfigError {
        ConfigError(file: spec.file, line: key.flatMap { spec.table[$0]?.line }, key: key, reason)
    }

    private func entry(_ key: String) -> TOMLTable.Entry? {
        consumed.insert(key)
        return spec.table[key]
    }

    public func optionalString(_ key: String) throws -> String? {
        guard let entry = entry(key) else { return nil }
        guard case .string(let value) = entry.value else {
            throw error(key, "expected a string, found \(entry.value.typeName)")
        }
        return value
    }

    public func string(_ key: String) throws -> String {
        guard let value = try optionalString(key) else { throw missing(key) }
        guard !value.isEmpty else { throw error(key, "must not be empty") }
        return value
    }

    /// An absolute path (relative paths in specs are ambiguous under cron).
    public func path(_ key: String) throws -> String {
        let value = try string(key)
        guard value.hasPrefix("/") else { throw error(key, "must be an absolute path, found \"\(value)\"") }
        return value
    }

    /// "missing required key", naming a near-miss key the spec has instead (a typo).
    public func missing(_ key: String) -> ConfigError {
        let typo = spec.table.keys.first { $0 != key && !consumed.contains($0) && editDistance($0, key) <= 2 }
        if let typo {
            return ConfigError(file: spec.file, line: spec.table[typo]?.line, key: typo,
                               "unknown key; the required key \"\(key)\" is missing (did you mean \"\(key)\"?)")
        }
        return error(nil, "missing required key \"\(key)\"")
    }

    public func optionalInt(_ key: String) throws -> Int? {
        guard let entry = entry(key) else { return nil }
        guard case .integer(let value) = entry.value else {
            throw error(key, "expected an integer, found \(entry.value.typeName)")
        }
        return Int(value)
    }

    public func int(_ key: String, default fallback: Int) throws -> Int {
        try optionalInt(key) ?? fallback
    }

    public func bool(_ key: String, default fallback: Bool) throws -> Bool {
        guard let entry = entry(key) else { return fallback }
        guard case .boolean(let value) = entry.value else {
            throw error(key, "expected true or false, found \(entry.value.typeName)")
        }
        return value
    }

    /// `"30s"`, `"500ms"`, `"2m"`; a bare integer is seconds.
    public func duration(_ key: String, default fallback: Duration) throws -> Duration {
        guard let entry = entry(key) else { return fallback }
        switch entry.value {
        case .integer(let seconds) where seconds >= 0:
            return .seconds(seconds)
        case .string(let text):
            guard let value = parseDuration(text) else {
                throw error(key, "expected a duration like \"30s\" or \"500ms\", found \"\(text)\"")
            }
            return value
        default:
            throw error(key, "expected a duration like \"30s\", found \(entry.value.typeName)")
        }
    }

    public func optionalStringArray(_ key: String) throws -> [String]? {
        guard let entry = entry(key) else { return nil }
        guard case .array(let values) = entry.value else {
            throw error(key, "expected an array of strings, found \(entry.value.typeName)")
        }
        return try values.map {
            guard case .string(let s) = $0 else { throw error(key, "expected an array of strings, found \($0.typeName) in it") }
            return s
        }
    }

    /// Refuses keys nobody read, naming the closest known one.
    public func finish() throws {
        for key in spec.table.keys where !consumed.contains(key) {
            let suggestion = consumed.min { editDistance($0, key) < editDistance($1, key) }
            let hint = suggestion.flatMap { editDistance($0, key) <= 2 ? " (did you mean \"\($0)\"?)" : nil } ?? ""
            var type = "?"
            if case .string(let value)? = spec.table["type"]?.value { type = value }
            throw error(key, "unknown key for a writer of type \"\(type)\"\(hint)")
        }
    }
}

/// Levenshtein distance, for "did you mean" hints.
func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(a.count, 1) where !a.isEmpty {
        var previous = row[0]
        row[0] = i
        for j in stride(from: 1, through: b.count, by: 1) {
            let current = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
            previous = current
        }
    }
    return a.isEmpty ? b.count : row[b.count]
}
