import Foundation
import Logging
import Quiesce
import QuiesceCore
import QuiesceDR

/// Checks what a checkpoint's snapshot holds on the primary: clones the snapshot files
/// (reflink, so the snapshot itself stays untouched), attaches and mounts the clones, runs
/// every writer's `verify` against the marker it recorded at freeze, then discards them.
/// The DR side does the same with `DRVerifier`.
public struct SnapshotCheck: Sendable {
    public var scratchDirectory: String
    public var logger: Logger

    public init(scratchDirectory: String, logger: Logger) {
        self.scratchDirectory = scratchDirectory
        self.logger = logger
    }

    public struct Result: Sendable, Codable {
        public var checkpoint: String
        public var ok: Bool
        public var writers: [WriterVerdict]
        public var problems: [String]
    }

    /// `writers` are the live writers by name (their `verify` knows how to check a copy).
    public func verify(_ record: CheckpointRecord, volumes: [Volume], writers: [any Writer]) async -> Result {
        var result = Result(checkpoint: record.id, ok: false, writers: [], problems: [])
        let images = record.snapshots.compactMap { snapshot -> (volume: String, image: String, liveMount: String?)? in
            guard let volume = volumes.first(where: { $0.name == snapshot.volume }), volume.mount != nil else { return nil }
            return (snapshot.volume, snapshot.path, volume.mount)
        }
        guard let first = images.first else { return result }
        // Clones must be on the snapshots' filesystem to be reflinks.
        let directory = "\((first.image as NSString).deletingLastPathComponent)/.check-\(record.id)-\(getpid())"
        do {
            let copy = try await MountedCopy.make(images, in: directory)
            let (verdicts, problems) = await CopyVerification.run(record, writers: writers, layout: copy.layout)
            result.writers = verdicts
            result.problems = problems + (await copy.release())
        } catch {
            result.problems.append("\(error)")
        }
        result.ok = result.problems.isEmpty && result.writers.allSatisfy(\.ok)
        return result
    }
}
