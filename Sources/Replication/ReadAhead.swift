import Foundation

/// Reads a known sequence of (offset, length) pieces of a file with several requests in
/// flight, so that scattered changed ranges are not read one synchronous request at a
/// time (on a random-read workload, queue depth is what a disk needs to go fast). The
/// consumer takes pieces in order; at most `depth` are read ahead of it.
final class ReadAhead: @unchecked Sendable {
    struct Piece { var offset: UInt64; var length: Int }

    private let fd: Int32
    private let path: String
    private let pieces: [Piece]
    private let depth: Int
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var issued = 0
    private var consumed = 0
    private var results: [Int: Result<[UInt8], Error>] = [:]
    private var closed = false
    private var running = 0
    /// Reads start at the consumer's first `take`: pieces it skips before (a resumed stream's
    /// first frames) are never read.
    private var started = false

    init(fd: Int32, path: String, pieces: [Piece], depth: Int = 16, threads: Int = 4) {
        self.fd = fd
        self.path = path
        self.pieces = pieces
        self.depth = depth
        guard !pieces.isEmpty else { return }
        running = threads
        for _ in 0..<threads {
            Thread { [self] in work() }.start()
        }
    }

    /// The bytes of piece `index`, which must be the next one the consumer needs.
    func take(_ index: Int) throws -> [UInt8] {
        condition.lock()
        defer { condition.unlock() }
        precondition(index == consumed, "read-ahead pieces are taken in order")
        if !started {
            started = true
            condition.broadcast()
        }
        while results[index] == nil { condition.wait() }
        // A failed read stays in place: the caller may try the same piece again (and gets
        // the same error), never the next one by mistake.
        let bytes = try results[index]!.get()
        results.removeValue(forKey: index)
        consumed += 1
        condition.broadcast()
        return bytes
    }

    /// Skips piece `index` (its bytes are not needed).
    func skip(_ index: Int) {
        condition.lock()
        defer { condition.unlock() }
        precondition(index == consumed, "read-ahead pieces are taken in order")
        results.removeValue(forKey: index)
        consumed += 1
        if issued < consumed { issued = consumed }
        condition.broadcast()
    }

    /// Stops the workers and waits for them (the file descriptor must outlive them).
    func close() {
        condition.lock()
        closed = true
        condition.broadcast()
        while running > 0 { condition.wait() }
        condition.unlock()
    }

    private func work() {
        condition.lock()
        while true {
            while !closed, issued < pieces.count, !started || issued >= consumed + depth { condition.wait() }
            if closed || issued >= pieces.count { break }
            let index = issued
            issued += 1
            condition.unlock()
            let result = Result { try read(pieces[index]) }
            condition.lock()
            if index >= consumed { results[index] = result }
            condition.broadcast()
        }
        running -= 1
        condition.broadcast()
        condition.unlock()
    }

    private func read(_ piece: Piece) throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: piece.length) { buffer, initialized in
            initialized = try DeltaReader.read(fd, into: UnsafeMutableRawBufferPointer(buffer), at: piece.offset, path: path)
        }
    }
}
