import QuiesceSQLite

/// The owner's `marker_query`: one read-only statement returning one value, recorded at freeze.
enum MarkerQuery {
    /// What an operator should write instead.
    static let example = "SELECT count(*) FROM orders"

    /// Why `sql` cannot be a marker query against the database `connection` is open on, or nil if
    /// it can. Throws the SQLite error when the database (not the query) is the problem: busy,
    /// unreadable, not a database.
    static func problem(_ sql: String, on connection: SQLiteConnection) throws -> String? {
        if let problem = problem(text: sql) { return problem }
        let shape: StatementShape
        do {
            shape = try connection.inspect(sql)
        } catch let error as SQLiteError where error.isStatementError {
            return "does not compile against \(connection.path): \(error.message)"
        }
        if shape.hasMoreStatements {
            return "must be a single statement, but more follow the first one"
        }
        if !shape.isReadOnly {
            return "must be read-only (a SELECT), but it would change the database"
        }
        if shape.columnCount != 1 {
            return "must return one column (one value), but returns \(shape.columnCount)"
        }
        return nil
    }

    /// Checks that need no database: not empty, starts with SELECT, WITH or VALUES.
    static func problem(text sql: String) -> String? {
        let keyword = leadingKeyword(sql)
        if keyword.isEmpty { return "must not be empty (remove the key to record no marker query)" }
        guard ["SELECT", "WITH", "VALUES"].contains(keyword) else {
            return "must be a SELECT statement, found one starting with \(keyword)"
        }
        return nil
    }

    /// The first word of `sql` after whitespace and comments, upper-cased.
    static func leadingKeyword(_ sql: String) -> String {
        var rest = Substring(sql)
        while true {
            rest = rest.drop { $0.isWhitespace }
            if rest.hasPrefix("--") {
                rest = rest.drop { $0 != "\n" }
            } else if rest.hasPrefix("/*") {
                guard let end = rest.range(of: "*/") else { return "" }
                rest = rest[end.upperBound...]
            } else {
                break
            }
        }
        return String(rest.prefix { $0.isLetter }).uppercased()
    }
}
