/// A small, strict TOML 1.0 parser for quiesce's own files (no dates or times).
///
/// Every error is a `ConfigError` carrying the file and the 1-based line, and says what
/// was expected and what was found:
/// `quiesce.toml:7: expected "=" after key "hold_timeout", found "10s"`.
public enum TOMLParser {
    /// Parses a whole document into its root table.
    public static func parse(_ text: String, file: String) throws -> TOMLTable {
        var parser = Parser(text: text, file: file)
        return try parser.document()
    }
}

// MARK: - The table tree while parsing

/// A table under construction. Tables remember how they came to be, because TOML's
/// redefinition rules depend on it; the finished document is converted to `TOMLTable`.
private final class TableNode {
    enum Kind {
        case root
        /// Created as the parent of a header (`a` in `[a.b]`): may still get its own `[a]`.
        case implicit
        /// Defined by its own `[a]` header, or an element of `[[a]]`.
        case header
        /// Created by a dotted key (`a.b = 1`): may be extended by more dotted keys only.
        case dotted
    }
    enum Child {
        case value(TOMLValue, line: Int)
        case table(TableNode)
        case tables([TableNode], line: Int)
    }

    var kind: Kind
    var line: Int
    private(set) var keys: [String] = []
    private(set) var children: [String: Child] = [:]

    init(_ kind: Kind, line: Int) {
        self.kind = kind
        self.line = line
    }

    subscript(key: String) -> Child? {
        get { children[key] }
        set {
            if children[key] == nil { keys.append(key) }
            children[key] = newValue
        }
    }

    func toml() -> TOMLTable {
        var table = TOMLTable(line: line)
        for key in keys {
            switch children[key]! {
            case .value(let value, let line): table.set(key, value, line: line)
            case .table(let node): table.set(key, .table(node.toml()), line: node.line)
            case .tables(let nodes, let line): table.set(key, .array(nodes.map { .table($0.toml()) }), line: line)
            }
        }
        return table
    }
}

/// `a.b`, `"my key".c`: a key path as it would be written.
private func display(_ path: some Collection<String>) -> String {
    path.map { part in
        !part.isEmpty && part.unicodeScalars.allSatisfy(isBareKeyScalar) ? part : "\"\(escaped(part))\""
    }.joined(separator: ".")
}

private func escaped(_ text: String) -> String {
    text.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"")
}

private func isBareKeyScalar(_ c: Unicode.Scalar) -> Bool {
    ("A"..."Z").contains(c) || ("a"..."z").contains(c) || ("0"..."9").contains(c) || c == "_" || c == "-"
}

/// Characters of unquoted values: numbers, booleans, inf/nan and (refused) dates.
private func isTokenScalar(_ c: Unicode.Scalar) -> Bool {
    isBareKeyScalar(c) || c == "+" || c == "." || c == ":"
}

private func isControl(_ c: Unicode.Scalar) -> Bool {
    (c.value < 0x20 && c != "\t") || c.value == 0x7F
}

private func hexValue(_ c: Unicode.Scalar) -> UInt32? {
    switch c {
    case "0"..."9": c.value - 48
    case "a"..."f": c.value - 87
    case "A"..."F": c.value - 55
    default: nil
    }
}

// MARK: - The parser

private struct Parser {
    let s: [Unicode.Scalar]
    let file: String
    var i = 0
    var line = 1
    let root = TableNode(.root, line: 1)
    /// The table that `key = value` lines go to: the last header's.
    var current: TableNode
    /// Arrays and inline tables nested in each other.
    var depth = 0

    init(text: String, file: String) {
        var scalars = Array(text.unicodeScalars)
        if scalars.first == "\u{FEFF}" { scalars.removeFirst() }
        s = scalars
        self.file = file
        current = root
    }

    func error(_ reason: String, line: Int? = nil) -> ConfigError {
        ConfigError(file: file, line: line ?? self.line, reason)
    }

    var peek: Scalar? { i < s.count ? s[i] : nil }
    typealias Scalar = Unicode.Scalar

    func peek(_ offset: Int) -> Scalar? { i + offset < s.count ? s[i + offset] : nil }

    mutating func consume(_ c: Scalar) -> Bool {
        guard peek == c else { return false }
        i += 1
        return true
    }

    func starts(with text: String) -> Bool {
        for (k, c) in text.unicodeScalars.enumerated() where peek(k) != c { return false }
        return true
    }

    /// What is at the cursor, for "found …": `"10s"`, `"="`, `end of line`.
    var found: String {
        guard let c = peek else { return "end of file" }
        if c == "\n" || c == "\r" { return "end of line" }
        if isControl(c) { return "control character U+\(String(c.value, radix: 16, uppercase: true))" }
        var text = ""
        var j = i
        if c == "\"" || c == "'" {
            // A quoted string, shown with its quotes.
            text.unicodeScalars.append(c)
            j += 1
            while j < s.count, s[j] != "\n", text.unicodeScalars.count < 40 {
                text.unicodeScalars.append(s[j])
                if s[j] == c { break }
                j += 1
            }
            return text
        }
        while j < s.count, isTokenScalar(s[j]), text.unicodeScalars.count < 40 {
            text.unicodeScalars.append(s[j])
            j += 1
        }
        if text.isEmpty { text = String(c) }
        return "\"\(text)\""
    }

    // MARK: Layout

    mutating func skipWhitespace() {
        while let c = peek, c == " " || c == "\t" { i += 1 }
    }

    mutating func newline() throws {
        if consume("\n") {
            line += 1
        } else if peek == "\r", peek(1) == "\n" {
            i += 2
            line += 1
        } else {
            throw error("a carriage return must be followed by a line feed")
        }
    }

    mutating func skipComment() throws {
        guard consume("#") else { return }
        while let c = peek, c != "\n", c != "\r" {
            if isControl(c) { throw error("expected printable text in a comment, found \(found)") }
            i += 1
        }
    }

    /// Whitespace, comments and newlines: between the items of an array.
    mutating func skipBlank() throws {
        while true {
            skipWhitespace()
            switch peek {
            case "#": try skipComment()
            case "\n", "\r": try newline()
            default: return
            }
        }
    }

    /// After a key/value pair or a header only a comment may follow on the line.
    mutating func endOfLine(after what: String) throws {
        skipWhitespace()
        try skipComment()
        guard let c = peek else { return }
        guard c == "\n" || c == "\r" else { throw error("expected end of line after \(what), found \(found)") }
        try newline()
    }

    // MARK: Document

    mutating func document() throws -> TOMLTable {
        while true {
            skipWhitespace()
            switch peek {
            case nil:
                return root.toml()
            case "#":
                try skipComment()
            case "\n", "\r":
                try newline()
            case "[":
                let path = try header()
                try endOfLine(after: "table header [\(display(path))]")
            default:
                let key = try keyValue(into: current)
                try endOfLine(after: "the value of key \"\(key)\"")
            }
        }
    }

    /// `[a.b]` or `[[a.b]]`: makes its table the current one.
    mutating func header() throws -> [String] {
        let headerLine = line
        _ = consume("[")
        let isArray = consume("[")
        skipWhitespace()
        if peek == "]" { throw error("expected a table name in the header, found \"]\"") }
        let path = try key()
        guard consume("]") else {
            throw error("expected \"]\(isArray ? "]" : "")\" to close the header [\(isArray ? "[" : "")\(display(path)), found \(found)")
        }
        if isArray {
            guard consume("]") else { throw error("expected \"]]\" to close the header [[\(display(path)), found \(found)") }
            current = try appendArrayTable(path, line: headerLine)
        } else {
            current = try defineTable(path, line: headerLine)
        }
        return path
    }

    /// The table for `[path]`, created along with any missing parents.
    func defineTable(_ path: [String], line: Int) throws -> TableNode {
        let parent = try walk(path.dropLast(), line: line, header: "[\(display(path))]")
        let name = display(path)
        switch parent[path.last!] {
        case nil:
            let node = TableNode(.header, line: line)
            parent[path.last!] = .table(node)
            return node
        case .table(let node):
            switch node.kind {
            case .implicit:
                node.kind = .header
                node.line = line
                return node
            case .dotted:
                throw error("table [\(name)] is already defined by dotted keys on line \(node.line)", line: line)
            case .header, .root:
                throw error("table [\(name)] is already defined on line \(node.line)", line: line)
            }
        case .tables(_, let first):
            throw error("[\(name)] is an array of tables (first on line \(first)): write [[\(name)]] to add one", line: line)
        case .value(let value, let valueLine):
            throw error("cannot define table [\(name)]: key \"\(name)\" is already set to \(value.typeName) on line \(valueLine)", line: line)
        }
    }

    /// A new element of the array of tables `[[path]]`.
    func appendArrayTable(_ path: [String], line: Int) throws -> TableNode {
        let parent = try walk(path.dropLast(), line: line, header: "[[\(display(path))]]")
        let name = display(path)
        let element = TableNode(.header, line: line)
        switch parent[path.last!] {
        case nil:
            parent[path.last!] = .tables([element], line: line)
        case .tables(let elements, let first):
            parent[path.last!] = .tables(elements + [element], line: first)
        case .table(let node):
            throw error("cannot define [[\(name)]]: [\(name)] is already a table (line \(node.line))", line: line)
        case .value(let value, let valueLine):
            throw error("cannot define [[\(name)]]: key \"\(name)\" is already set to \(value.typeName) on line \(valueLine)", line: line)
        }
        return element
    }

    /// The parents of a header, created as implicit tables; the last element of an array of tables.
    func walk(_ path: ArraySlice<String>, line: Int, header: String) throws -> TableNode {
        var node = root
        for (k, part) in path.enumerated() {
            let name = display(path.prefix(k + 1))
            switch node[part] {
            case nil:
                let child = TableNode(.implicit, line: line)
                node[part] = .table(child)
                node = child
            case .table(let child):
                node = child
            case .tables(let elements, _):
                node = elements.last!
            case .value(let value, let valueLine):
                throw error("cannot define \(header): key \"\(name)\" is already set to \(value.typeName) on line \(valueLine)", line: line)
            }
        }
        return node
    }

    // MARK: Keys and values

    /// `key = value` into `table`; returns the key as written.
    mutating func keyValue(into table: TableNode) throws -> String {
        let keyLine = line
        let path = try key()
        let name = display(path)
        guard consume("=") else { throw error("expected \"=\" after key \"\(name)\", found \(found)") }
        skipWhitespace()
        let value = try self.value(for: "key \"\(name)\"")
        try insert(value, at: path, into: table, line: keyLine)
        return name
    }

    func insert(_ value: TOMLValue, at path: [String], into table: TableNode, line: Int) throws {
        var node = table
        for (k, part) in path.dropLast().enumerated() {
            let name = display(path.prefix(k + 1))
            switch node[part] {
            case nil:
                let child = TableNode(.dotted, line: line)
                node[part] = .table(child)
                node = child
            case .table(let child) where child.kind == .dotted:
                node = child
            case .table(let child):
                throw error("cannot set \"\(display(path))\": table \"\(name)\" is defined on line \(child.line), add the key under its header", line: line)
            case .tables(_, let first):
                throw error("cannot set \"\(display(path))\": \"\(name)\" is an array of tables (line \(first))", line: line)
            case .value(let existing, let valueLine):
                throw error("cannot set \"\(display(path))\": key \"\(name)\" is already set to \(existing.typeName) on line \(valueLine)", line: line)
            }
        }
        let last = path.last!
        if let existing = node[last] {
            let first = switch existing {
            case .value(_, let l), .tables(_, let l): l
            case .table(let child): child.line
            }
            throw error("duplicate key \"\(display(path))\" (first set on line \(first))", line: line)
        }
        node[last] = .value(value, line: line)
    }

    /// A dotted key: `a`, `"quoted key"`, `a . b."c"`. Leaves the cursor after trailing whitespace.
    mutating func key() throws -> [String] {
        var parts: [String] = []
        repeat {
            skipWhitespace()
            parts.append(try simpleKey(after: parts))
            skipWhitespace()
        } while consume(".")
        return parts
    }

    mutating func simpleKey(after parts: [String]) throws -> String {
        switch peek {
        case "\"":
            if starts(with: "\"\"\"") { throw error("a key cannot be a multi-line string") }
            return try basicString()
        case "'":
            if starts(with: "'''") { throw error("a key cannot be a multi-line string") }
            return try literalString()
        case let c? where isBareKeyScalar(c):
            var key = ""
            while let c = peek, isBareKeyScalar(c) {
                key.unicodeScalars.append(c)
                i += 1
            }
            return key
        default:
            let place = parts.isEmpty ? "" : " after \"\(display(parts)).\""
            throw error("expected a key\(place), found \(found)")
        }
    }

    mutating func value(for owner: String) throws -> TOMLValue {
        switch peek {
        case "\"":
            return .string(starts(with: "\"\"\"") ? try multilineBasicString() : try basicString())
        case "'":
            return .string(starts(with: "'''") ? try multilineLiteralString() : try literalString())
        case "[":
            return try array()
        case "{":
            return try inlineTable()
        case let c? where isTokenScalar(c):
            return try bareValue()
        default:
            throw error("expected a value for \(owner), found \(found)")
        }
    }

    mutating func nested<T>(_ body: (inout Parser) throws -> T) throws -> T {
        depth += 1
        defer { depth -= 1 }
        guard depth <= 64 else { throw error("arrays and inline tables are nested too deeply (more than 64 levels)") }
        return try body(&self)
    }

    mutating func array() throws -> TOMLValue {
        let startLine = line
        _ = consume("[")
        return try nested { p in
            var items: [TOMLValue] = []
            while true {
                try p.skipBlank()
                if p.consume("]") { break }
                items.append(try p.value(for: "the array started on line \(startLine)"))
                try p.skipBlank()
                if p.consume(",") { continue }
                if p.consume("]") { break }
                throw p.error("expected \",\" or \"]\" in the array started on line \(startLine), found \(p.found)")
            }
            return .array(items)
        }
    }

    mutating func inlineTable() throws -> TOMLValue {
        let startLine = line
        _ = consume("{")
        return try nested { p in
            let table = TableNode(.header, line: startLine)
            p.skipWhitespace()
            if p.consume("}") { return .table(table.toml()) }
            while true {
                p.skipWhitespace()
                if p.peek == "}" { throw p.error("expected a key after \",\" in the inline table (TOML allows no trailing comma there), found \"}\"") }
                _ = try p.keyValue(into: table)
                p.skipWhitespace()
                if p.consume(",") { continue }
                if p.consume("}") { break }
                let hint = p.peek == "\n" || p.peek == "\r" ? " (an inline table must fit on one line)" : ""
                throw p.error("expected \",\" or \"}\" in the inline table, found \(p.found)\(hint)")
            }
            return .table(table.toml())
        }
    }

    // MARK: Strings

    mutating func basicString() throws -> String {
        let startLine = line
        _ = consume("\"")
        var text = ""
        while true {
            guard let c = peek, c != "\n", c != "\r" else {
                throw error("unterminated string: expected a closing \" on the same line", line: startLine)
            }
            if isControl(c) { throw error("expected printable text in a string, found \(found) (write it as an escape like \\t)") }
            i += 1
            switch c {
            case "\"": return text
            case "\\": text.unicodeScalars.append(try escape())
            default: text.unicodeScalars.append(c)
            }
        }
    }

    /// After a backslash.
    mutating func escape() throws -> Scalar {
        guard let c = peek else { throw error("expected an escape after \"\\\", found end of file") }
        i += 1
        switch c {
        case "b": return "\u{08}"
        case "t": return "\t"
        case "n": return "\n"
        case "f": return "\u{0C}"
        case "r": return "\r"
        case "e": return "\u{1B}"
        case "\"": return "\""
        case "\\": return "\\"
        case "u", "U":
            let count = c == "u" ? 4 : 8
            var value: UInt32 = 0
            for _ in 0..<count {
                guard let h = peek.flatMap(hexValue) else {
                    throw error("expected \(count) hex digits after \"\\\(c)\", found \(found)")
                }
                value = value * 16 + h
                i += 1
            }
            guard let scalar = Unicode.Scalar(value) else {
                throw error("\"\\\(c)\(String(value, radix: 16, uppercase: true))\" is not a Unicode scalar value")
            }
            return scalar
        default:
            throw error("invalid escape \"\\\(c)\" in a string (write \\\\ for a backslash, or use a 'literal string')")
        }
    }

    mutating func literalString() throws -> String {
        let startLine = line
        _ = consume("'")
        var text = ""
        while true {
            guard let c = peek, c != "\n", c != "\r" else {
                throw error("unterminated literal string: expected a closing ' on the same line", line: startLine)
            }
            if c == "'" { i += 1; return text }
            if isControl(c) { throw error("expected printable text in a string, found \(found)") }
            text.unicodeScalars.append(c)
            i += 1
        }
    }

    /// `"""…"""`: a newline right after the opening quotes is dropped; a backslash at the end
    /// of a line joins it to the next non-blank text.
    mutating func multilineBasicString() throws -> String {
        try multiline(quote: "\"") { p, text in
            guard p.peek == "\\" else { return false }
            // A line-ending backslash: skip whitespace up to the newline, then all blank space.
            var j = p.i + 1
            while j < p.s.count, p.s[j] == " " || p.s[j] == "\t" { j += 1 }
            if j < p.s.count, p.s[j] == "\n" || p.s[j] == "\r" {
                p.i = j
                while let c = p.peek, c == " " || c == "\t" || c == "\n" || c == "\r" {
                    if c == "\n" || c == "\r" { try p.newline() } else { p.i += 1 }
                }
            } else {
                p.i += 1
                text.unicodeScalars.append(try p.escape())
            }
            return true
        }
    }

    mutating func multilineLiteralString() throws -> String {
        try multiline(quote: "'") { _, _ in false }
    }

    /// The common shape of both multi-line strings; `special` handles escapes.
    mutating func multiline(quote: Scalar, special: (inout Parser, inout String) throws -> Bool) throws -> String {
        let startLine = line
        let delimiter = String(repeating: String(quote), count: 3)
        i += 3
        if peek == "\n" || peek == "\r" { try newline() }
        var text = ""
        while true {
            guard let c = peek else {
                throw error("unterminated multi-line string: expected a closing \(delimiter)", line: startLine)
            }
            if c == quote {
                var run = 0
                while peek(run) == quote { run += 1 }
                if run >= 3 {
                    // Up to two quotes may sit right before the closing delimiter.
                    guard run <= 5 else { throw error("expected at most 5 quotes to end a multi-line string, found \(run)") }
                    text += String(repeating: String(quote), count: run - 3)
                    i += run
                    return text
                }
                text += String(repeating: String(quote), count: run)
                i += run
            } else if c == "\n" || c == "\r" {
                try newline()
                text += "\n"
            } else if try special(&self, &text) {
                continue
            } else {
                if isControl(c) { throw error("expected printable text in a string, found \(found)") }
                text.unicodeScalars.append(c)
                i += 1
            }
        }
    }

    // MARK: Numbers, booleans

    mutating func bareValue() throws -> TOMLValue {
        var token = ""
        let start = i
        while let c = peek, isTokenScalar(c) {
            token.unicodeScalars.append(c)
            i += 1
        }
        switch token {
        case "true": return .boolean(true)
        case "false": return .boolean(false)
        case "inf", "+inf": return .float(.infinity)
        case "-inf": return .float(-.infinity)
        case "nan", "+nan", "-nan": return .float(.nan)
        default: break
        }
        if Self.looksLikeDateOrTime(token) {
            throw error("dates and times are not supported, found \"\(token)\" (write it as a quoted string)")
        }
        if let number = try number(token) { return number }
        i = start
        let hint = token.first?.isLetter == true ? " (strings must be quoted: \"\(token)\")" : ""
        throw error("expected a value (a string, number, boolean, array or inline table), found \(found)\(hint)")
    }

    static func looksLikeDateOrTime(_ token: String) -> Bool {
        let c = Array(token.unicodeScalars)
        func digits(_ range: Range<Int>) -> Bool {
            range.upperBound <= c.count && range.allSatisfy { ("0"..."9").contains(c[$0]) }
        }
        let date = digits(0..<4) && c.count > 4 && c[4] == "-" && digits(5..<7)
        let time = digits(0..<2) && c.count > 2 && c[2] == ":"
        return date || time
    }

    /// An integer or float, nil if `token` is not shaped like a number.
    func number(_ token: String) throws -> TOMLValue? {
        var body = Substring(token)
        for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] where body.hasPrefix(prefix) {
            let digits = body.dropFirst(2)
            guard let clean = try cleanDigits(digits, in: token, radix: radix) else { return nil }
            guard let value = UInt64(clean, radix: radix), value <= UInt64(Int64.max) else {
                throw error("integer \(token) does not fit in 64 bits")
            }
            return .integer(Int64(value))
        }
        let sign = body.first == "-" || body.first == "+" ? String(body.removeFirst()) : ""
        guard let first = body.first, first.isASCII, first.isNumber else { return nil }

        // Split into integer part, fraction and exponent.
        let exponentIndex = body.firstIndex { $0 == "e" || $0 == "E" }
        let mantissa = body[..<(exponentIndex ?? body.endIndex)]
        let dot = mantissa.firstIndex(of: ".")
        let integerPart = mantissa[..<(dot ?? mantissa.endIndex)]
        guard let integer = try cleanDigits(integerPart, in: token, radix: 10) else { return nil }
        if integer.count > 1, integer.hasPrefix("0") {
            throw error("expected a number without leading zeros, found \"\(token)\"")
        }
        if dot == nil, exponentIndex == nil {
            guard let value = Int64(sign + integer) else { throw error("integer \(token) does not fit in 64 bits") }
            return .integer(value)
        }
        var text = sign + integer
        if let dot {
            guard let fraction = try cleanDigits(mantissa[mantissa.index(after: dot)...], in: token, radix: 10) else {
                throw error("expected digits after the decimal point, found \"\(token)\"")
            }
            text += "." + fraction
        }
        if let exponentIndex {
            var exponent = body[body.index(after: exponentIndex)...]
            var exponentSign = ""
            if exponent.first == "-" || exponent.first == "+" { exponentSign = String(exponent.removeFirst()) }
            guard let digits = try cleanDigits(exponent, in: token, radix: 10) else {
                throw error("expected digits in the exponent, found \"\(token)\"")
            }
            text += "e" + exponentSign + digits
        }
        guard let value = Double(text) else { return nil }
        return .float(value)
    }

    /// Digits with single underscores between them, underscores removed; nil if empty or not digits.
    func cleanDigits(_ digits: Substring, in token: String, radix: Int) throws -> String? {
        guard !digits.isEmpty else { return nil }
        var clean = ""
        var previousWasDigit = false
        for c in digits {
            if c == "_" {
                guard previousWasDigit else {
                    throw error("expected a digit on each side of \"_\" in a number, found \"\(token)\"")
                }
                previousWasDigit = false
                continue
            }
            guard c.isASCII, c.hexDigitValue.map({ $0 < radix }) == true else { return nil }
            clean.append(c)
            previousWasDigit = true
        }
        guard previousWasDigit else { throw error("expected a digit on each side of \"_\" in a number, found \"\(token)\"") }
        return clean
    }
}
