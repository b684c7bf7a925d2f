import Foundation
import Quiesce
import QuiesceConfig
import QuiesceCore
import QuiesceReplication

/// One writer's verdict on a copy.
public struct WriterVerdict: Sendable, Codable, Equatable {
    public var writer: String
    public var type: String
    public var ok: Bool
    public var details: [String]
}

/// Runs every writer's `verify` of a checkpoint against its recorded marker on a mounted copy.
public enum CopyVerification {
    /// `writers` by name; a writer of the record that is missing from them is a problem.
    public static func run(_ record: CheckpointRecord, writers: [any Writer], layout: CopyLayout) async -> (verdicts: [WriterVerdict], problems: [String]) {
        var verdicts: [WriterVerdict] = []
        var problems: [String] = []
        for result in record.writers {
            guard let marker = result.marker else { continue }
            guard let writer = writers.first(where: { $0.name == result.name }) else {
                problems.append("writer \(result.name) (\(result.type)) has no spec to verify with")
                continue
            }
            do {
                let report = try await writer.verify(copy: layout, marker: marker)
                verdicts.append(WriterVerdict(writer: writer.name, type: writer.type, ok: report.ok, details: report.details))
            } catch {
                verdicts.append(WriterVerdict(writer: writer.name, type: writer.type, ok: false, details: ["\(error)"]))
            }
        }
        return (verdicts, problems)
    }

    /// Writers built from the drop-ins a checkpoint carried (the DR side has no writers.d).
    public static func writers(from environment: CheckpointEnvironment?) -> (writers: [any Writer], problems: [String]) {
        var writers: [any Writer] = []
        var problems: [String] = []
        for spec in environment?.writers ?? [] {
            do {
                let parsed = try WriterDirectory.parseSpec(text: spec.text, origin: "the manifest's drop-in of \(spec.name)")
                writers.append(try WriterTypes.makeWriter(parsed, defaultTimeout: Configuration.defaultFreezeTimeout).0)
            } catch {
                problems.append("writer \(spec.name): its drop-in does not load here: \(error)")
            }
        }
        return (writers, problems)
    }
}

/// What `dr verify` found for one checkpoint: recorded beside it in the store
/// (`<volume>/<id>.verify.json`) and shown by `quiesce dr verify` and `targets status`.
public struct DRVerification: Sendable, Codable, Equatable {
    public var checkpoint: String
    public var volumes: [String]
    public var ok: Bool
    public var verifiedAt: Date
    public var writers: [WriterVerdict]
    public var problems: [String]
    /// Housekeeping before this verify: what an abandoned verify had left (mounts, loop
    /// devices, applications) and whether it could be cleaned up. Not about this copy.
    public var cleanup: [String]?

    /// One line per failure, naming the writer and the reason.
    public var failures: [String] {
        problems + writers.filter { !$0.ok }.map { verdict in
            "writer \(verdict.writer) (\(verdict.type)): " + (verdict.details.filter { $0.contains("FAIL") || $0.contains("fail") || $0.contains("error") }.first
                ?? verdict.details.last ?? "failed")
        }
    }
}

/// Verifies received checkpoints in a DR store: clone, attach, mount privately, run every
/// writer's verify from the manifest, stop, unmount, detach, discard; record the result.
public struct DRVerifier: Sendable {
    public var store: DRStore

    public init(store: DRStore) {
        self.store = store
    }

    /// The checkpoint ids to verify: `checkpoint` (an id or `latest`) of `volume`, or of every volume.
    public func verify(volume: String? = nil, checkpoint: String? = nil) async throws -> [DRVerification] {
        let volumes = volume.map { [$0] } ?? store.volumes()
        guard !volumes.isEmpty else { throw DRError("the store \(store.root) has no checkpoints yet") }
        var ids: [String] = []
        for name in volumes {
            let available = store.checkpoints(volume: name)
            guard !available.isEmpty else { throw DRError("the store has no checkpoint of volume \(name) (volumes: \(store.volumes().joined(separator: ", ")))") }
            if let checkpoint, checkpoint != "latest" {
                guard available.contains(checkpoint) else {
                    throw DRError("the store has no checkpoint \(checkpoint) of volume \(name) (newest: \(available.last!))")
                }
                ids.append(checkpoint)
            } else {
                ids.append(available.last!)
            }
        }
        var results: [DRVerification] = []
        for id in Set(ids).sorted() {
            results.append(try await verify(checkpoint: id, volumes: volumes.filter { store.checkpoints(volume: $0).contains(id) }))
        }
        return results
    }

    /// Verifies one checkpoint with every listed volume's copy mounted together.
    public func verify(checkpoint id: String, volumes: [String]) async throws -> DRVerification {
        var manifests: [StoredCheckpoint] = []
        for volume in volumes { manifests.append(try store.manifest(volume: volume, checkpoint: id)) }
        let environment = manifests.compactMap(\.environment).first
        let record = manifests[0].record
        var result = DRVerification(checkpoint: id, volumes: volumes, ok: false, verifiedAt: Date(), writers: [], problems: [])
        let (writers, specProblems) = CopyVerification.writers(from: environment)
        result.problems += specProblems
        if environment == nil {
            result.problems.append("the manifest carries no writer drop-ins (sent by an older quiesce): nothing to verify with")
        }
        let images = volumes.map { volume in
            (volume: volume, image: store.imagePath(volume: volume, checkpoint: id),
             liveMount: environment?.volumes.first { $0.name == volume }?.mount)
        }
        // A verify killed midway (its receiver given up on, a crash) leaves its copy mounted
        // and maybe an application running on it: the next verify in this store cleans up.
        let (swept, stuck) = await MountedCopy.sweepAbandoned(in: "\(store.root)/.work", prefix: "verify-")
        if !(swept + stuck).isEmpty { result.cleanup = swept + stuck.map { "left for the next verify: \($0)" } }
        let copy = try await MountedCopy.make(images, in: "\(store.root)/.work/verify-\(id)-\(getpid())")
        let (verdicts, problems) = await CopyVerification.run(record, writers: writers, layout: copy.layout)
        result.writers = verdicts
        result.problems += problems
        result.problems += await copy.release()
        result.verifiedAt = Date()
        result.ok = result.problems.isEmpty && result.writers.allSatisfy(\.ok)
        for volume in volumes { try save(result, volume: volume) }
        return result
    }

    /// The recorded verification of a checkpoint, if any.
    public func recorded(volume: String, checkpoint: String) -> DRVerification? {
        guard let data = FileManager.default.contents(atPath: store.verificationPath(volume: volume, checkpoint: checkpoint)) else { return nil }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try? decoder.decode(DRVerification.self, from: data)
    }

    /// The newest checkpoint of the volume whose recorded verification passed.
    public func newestVerified(volume: String) -> String? { store.newestVerified(volume: volume) }

    private func save(_ result: DRVerification, volume: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        let path = store.verificationPath(volume: volume, checkpoint: result.checkpoint)
        try encoder.encode(result).write(to: URL(fileURLWithPath: path + ".tmp"))
        guard rename(path + ".tmp", path) == 0 else { throw DRError("cannot record \(path): \(String(cString: strerror(errno)))") }
    }
}

extension DRVerifier {
    /// The `--verify` hook of `receive` and `serve`: verifies a checkpoint that just landed,
    /// with every volume of it the store has. Blocks its thread: call it from a receiver's
    /// own thread, never from the Swift concurrency pool.
    public func verifyBlocking(_ summary: ReceiveSummary, log: @escaping @Sendable (String) -> Void) -> VerificationOutcome {
        let store = self.store
        let volumes = store.volumes().filter { store.checkpoints(volume: $0).contains(summary.checkpoint) }
        let outcome = waitFor { () async -> VerificationOutcome in
            do {
                let result = try await DRVerifier(store: store).verify(checkpoint: summary.checkpoint, volumes: volumes)
                return VerificationOutcome(ok: result.ok, failures: result.failures)
            } catch {
                return VerificationOutcome(ok: false, failures: ["\(error)"])
            }
        }
        log("verified \(summary.checkpoint): " + (outcome.ok ? "ok" : "FAILED: " + outcome.failures.joined(separator: "; ")))
        return outcome
    }
}

/// Runs async work to completion from a thread that may block (not a pool thread).
func waitFor<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let semaphore = DispatchSemaphore(value: 0)
    let box = ResultBox<T>()
    Task {
        box.value = await body()
        semaphore.signal()
    }
    semaphore.wait()
    return box.value!
}

private final class ResultBox<T>: @unchecked Sendable {
    // Written once by the task before the semaphore is signalled, read after the wait.
    var value: T?
}
