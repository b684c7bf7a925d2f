import Foundation
import QuiesceConfig
import Testing

/// Runs `body` in a fresh directory under the system temporary directory, removed afterwards.
func withTemporaryDirectory<T>(_ body: (String) throws -> T) throws -> T {
    let path = NSTemporaryDirectory() + "quiesce-config-tests-" + UUID().uuidString
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                            attributes: [.posixPermissions: 0o755])
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try body(path)
}

/// Writes `text` to `directory/name` with `mode`; returns the path.
@discardableResult
func writeFile(_ directory: String, _ name: String, _ text: String, mode: Int = 0o644) throws -> String {
    let path = directory + "/" + name
    try Data(text.utf8).write(to: URL(fileURLWithPath: path))
    try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: path)
    return path
}

/// File names in `directory`, hidden ones included, sorted.
func listing(_ directory: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
}

/// The value at a dotted path of plain keys (`"coordinator", "catalog"`), looking into tables.
func lookup(_ table: TOMLTable, _ path: String...) -> TOMLValue? {
    var current = table
    for (k, key) in path.enumerated() {
        guard let value = current[key]?.value else { return nil }
        if k == path.count - 1 { return value }
        guard case .table(let next) = value else { return nil }
        current = next
    }
    return nil
}

/// The `ConfigError` that `body` throws, recording an issue if it throws nothing or something else.
func configError(sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) -> ConfigError? {
    do {
        try body()
        Issue.record("expected a ConfigError, but nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as ConfigError {
        return error
    } catch {
        Issue.record("expected a ConfigError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
    return nil
}
