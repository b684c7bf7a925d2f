import Foundation
import QuiesceCore

extension SQLiteWriter: CopyStartable {
    /// Nothing to start: SQLite is a library. Reports the copy's database, which testers open
    /// directly (it is writable: the copy is a clone, discarded with every change at `dr test stop`).
    public func startOnCopy(_ copy: CopyLayout, marker: ConsistencyMarker, workDirectory: String) async throws -> RunningCopy {
        let live = marker[Self.databaseKey] ?? database
        guard let path = copy.translate(live) else {
            throw WriterError(.nonRetryable, "\(live) is on no volume of the copy (copied mounts: \(copy.mounts.keys.sorted().joined(separator: ", ")))")
        }
        guard Self.fileExists(path) else {
            throw WriterError(.nonRetryable, "the copy has no database at \(path)")
        }
        return RunningCopy(writer: name, type: type, access: ["sqlite3 \(path)   (the copy of \(live))"],
                           state: ["database": path])
    }

    /// Nothing runs: nothing to stop.
    public func stopOnCopy(_ running: RunningCopy) async throws {}
}
