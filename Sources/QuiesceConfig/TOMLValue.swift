/// A parsed TOML value. Tables remember the line each key was set on, so errors can point at it.
public enum TOMLValue: Sendable, Equatable {
    case string(String)
    case integer(Int64)
    case float(Double)
    case boolean(Bool)
    case array([TOMLValue])
    case table(TOMLTable)

    /// `string`, `integer`, …: used in "expected a string, found an integer".
    public var typeName: String {
        switch self {
        case .string: "a string"
        case .integer: "an integer"
        case .float: "a float"
        case .boolean: "a boolean"
        case .array: "an array"
        case .table: "a table"
        }
    }
}

/// A TOML table: keys in the order written, each with its value and line.
public struct TOMLTable: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var value: TOMLValue
        public var line: Int
        public init(value: TOMLValue, line: Int) {
            self.value = value
            self.line = line
        }
    }

    public private(set) var keys: [String] = []
    public private(set) var entries: [String: Entry] = [:]
    /// Where the table starts (its `[header]` line, or 1 for the root).
    public var line: Int

    public init(line: Int = 1) { self.line = line }

    public subscript(key: String) -> Entry? { entries[key] }

    /// Sets a key; returns false if it was already set (TOML forbids redefinition).
    @discardableResult
    public mutating func set(_ key: String, _ value: TOMLValue, line: Int) -> Bool {
        if entries[key] != nil { return false }
        keys.append(key)
        entries[key] = Entry(value: value, line: line)
        return true
    }

    /// Replaces a key's value in place (used while building nested tables and arrays of tables).
    public mutating func replace(_ key: String, _ value: TOMLValue) {
        guard entries[key] != nil else { return }
        entries[key]!.value = value
    }
}
