// The postgresql writer (issue 4): see PostgreSQLWriter.swift.
