import Foundation
import Logging
import QuiesceCatalog
import QuiesceConfig
import QuiesceCore
import QuiesceGuard

/// quiesce as configured on this host: the config, its registry, its catalog.
/// Each command of the CLI is one call on this type.
public struct Installation: Sendable {
    public var configuration: Configuration
    /// The `quiesce` executable, started as `quiesce guard` for each checkpoint.
    public var guardExecutable: String
    public var logger: Logger

    public init(configPath: String, guardExecutable: String, logger: Logger) throws {
        let configuration = try Configuration.load(path: configPath)
        try Providers.validate(configuration)
        self.init(configuration: configuration, guardExecutable: guardExecutable, logger: logger)
    }

    public init(configuration: Configuration, guardExecutable: String, logger: Logger) {
        self.configuration = configuration
        self.guardExecutable = guardExecutable
        self.logger = logger
    }

    public func registry() -> Registry { Registry.load(configuration) }

    public func openCatalog() throws -> Catalog { try Catalog(path: configuration.catalog) }

    public func coordinator(writers: [any Writer], journal: any CheckpointJournal) -> Coordinator {
        let executable = guardExecutable
        return Coordinator(writers: writers, volumes: configuration.volumes, providers: Providers.all,
                           holdTimeout: configuration.holdTimeout, journal: journal,
                           startGuard: { try await GuardProcess.start(executable: executable) },
                           logger: logger)
    }

    // MARK: checkpoint

    /// One checkpoint, cron-safe: takes the catalog's lock (or throws `CheckpointLock.Held`),
    /// cleans up after a coordinator that died, refuses an invalid registry, runs the coordinator.
    public func checkpoint(label: String?) async throws -> CheckpointResult {
        let lock = try CheckpointLock.acquire(catalogPath: configuration.catalog,
                                              holder: "quiesce checkpoint" + (label.map { " --label \($0)" } ?? ""))
        defer { lock.release() }
        let catalog = try openCatalog()
        try discardInterrupted(catalog)

        let registry = registry()
        guard registry.errors.isEmpty else { throw RegistryInvalid(errors: registry.errors) }
        if registry.writers.isEmpty {
            logger.warning("no writers registered: the snapshot will be crash-consistent only",
                           metadata: ["writers_dir": "\(configuration.writersDirectory)"])
        }
        for volume in configuration.volumes {
            for risk in Providers.all[volume.provider]?.holdWindowRisks([volume], holdTimeout: configuration.holdTimeout) ?? [] {
                logger.warning("\(risk)")
            }
        }
        let result = await coordinator(writers: registry.writers, journal: catalog).checkpoint(label: label)
        if result.record.outcome == .completed, !registry.specs.isEmpty {
            // The DR side verifies this checkpoint with the drop-ins it was taken with, even if
            // writers.d changes before it is replicated.
            do {
                try catalog.recordSpecs(checkpointID: result.record.id, registry.specs)
            } catch {
                logger.warning("could not record the writers' drop-ins with the checkpoint; replication will send the drop-ins of its own time",
                               metadata: ["checkpoint": "\(result.record.id)", "error": "\(error)"])
            }
        }
        return result
    }

    /// Rows a dead coordinator left `running`: mark them aborted and remove their partial snapshots.
    func discardInterrupted(_ catalog: Catalog) throws {
        for record in try catalog.recoverInterrupted() {
            logger.warning("checkpoint was interrupted by a coordinator that stopped; removing its partial snapshots",
                           metadata: ["checkpoint": "\(record.id)"])
            for volume in configuration.volumes {
                try? Providers.all[volume.provider]?.discard([volume], checkpointID: record.id)
            }
        }
    }

    // MARK: writers

    public struct WriterListing: Sendable, Codable {
        public var name: String
        public var type: String?
        public var file: String?
        public var state: String
        public var lastError: String
        public var lastErrorMessage: String?
        public var lastSuccessfulCheckpoint: String?
    }

    /// Every writer in the registry with its last known state; a bad drop-in is listed with its error.
    public func listWriters() throws -> [WriterListing] {
        let registry = registry()
        let statuses = (try? openCatalog().writerStatuses()) ?? []
        var listings: [WriterListing] = []
        for entry in registry.entries {
            if let error = entry.error {
                listings.append(WriterListing(name: entry.name ?? "(unnamed)", type: entry.type, file: entry.file,
                                              state: "invalid-spec", lastError: WriterErrorKind.nonRetryable.rawValue,
                                              lastErrorMessage: error.description, lastSuccessfulCheckpoint: nil))
                continue
            }
            let status = statuses.first { $0.name == entry.name }
            listings.append(WriterListing(name: entry.name ?? "?", type: entry.type, file: entry.file,
                                          state: status?.state ?? WriterState.stable.description,
                                          lastError: status?.lastErrorKind.rawValue ?? WriterErrorKind.none.rawValue,
                                          lastErrorMessage: status?.lastError,
                                          lastSuccessfulCheckpoint: status?.lastSuccessfulCheckpoint))
        }
        return listings
    }

    /// identify + prepare of one writer, without freezing anything.
    public func checkWriter(name: String) async throws -> [Volume] {
        let registry = registry()
        guard let entry = registry.entries.first(where: { $0.name == name }) else {
            throw UsageError("no writer named \"\(name)\" in \(registry.directory) (see `quiesce writers list`)")
        }
        if let error = entry.error { throw error }
        let coordinator = coordinator(writers: [entry.writer!], journal: NoJournal())
        switch await coordinator.check(writer: entry.writer!) {
        case .success(let volumes): return volumes
        case .failure(let error): throw error
        }
    }

    /// Validates a spec file (syntax, type, keys), then — unless `checkConnectivity` is false —
    /// runs the writer's identify and prepare (can it reach its application; is its data on a
    /// volume of the set?), and only then installs it into `writers.d/` with mode 0600.
    public func addWriter(file: String, checkConnectivity: Bool = true) async throws -> String {
        let directory = WriterDirectory(path: configuration.writersDirectory)
        let timeout = configuration.freezeTimeout
        if checkConnectivity {
            let (writer, _) = try WriterTypes.makeWriter(try WriterDirectory.parseSpec(file: file), defaultTimeout: timeout)
            if case .failure(let error) = await coordinator(writers: [writer], journal: NoJournal()).check(writer: writer) {
                throw error
            }
        }
        return try directory.install(from: file) { spec in
            _ = try WriterTypes.makeWriter(spec, defaultTimeout: timeout)
        }
    }

    public func removeWriter(name: String) throws -> String {
        let path = try WriterDirectory(path: configuration.writersDirectory).remove(name: name)
        try? openCatalog().forgetWriter(name: name)
        return path
    }

    // MARK: checkpoints

    /// Without `details`: no writers and snapshot files (the text listing needs neither).
    public func listCheckpoints(limit: Int?, details: Bool = true) throws -> [CheckpointRecord] {
        try openCatalog().checkpoints(limit: limit, details: details)
    }

    public func showCheckpoint(id: String) throws -> CheckpointRecord {
        guard let record = try openCatalog().checkpoint(id: id) else {
            throw UsageError("no checkpoint \"\(id)\" in \(configuration.catalog) (see `quiesce checkpoints list`)")
        }
        return record
    }

    public struct PruneReport: Sendable, Codable {
        public var deleted: [String]
        public var keptForTargets: [String]
    }

    static let pruneBatch = 500

    /// Deletes all but the newest `keep` completed checkpoints (snapshot files, then rows),
    /// never one that a DR target still needs as its base.
    public func prune(keep: Int) throws -> PruneReport {
        let lock = try CheckpointLock.acquire(catalogPath: configuration.catalog, holder: "quiesce checkpoints prune")
        defer { lock.release() }
        let catalog = try openCatalog()
        var report = PruneReport(deleted: [], keptForTargets: try catalog.holds().map(\.checkpointID))
        // Snapshot files first, then the rows, a batch per transaction.
        let candidates = try catalog.pruneCandidates(keep: keep)
        for start in stride(from: 0, to: candidates.count, by: Self.pruneBatch) {
            let batch = candidates[start..<min(start + Self.pruneBatch, candidates.count)]
            for record in batch {
                for snapshot in record.snapshots {
                    let provider = configuration.volumes.first { $0.name == snapshot.volume }
                        .flatMap { Providers.all[$0.provider] } ?? Providers.all["reflink"]!
                    try provider.delete(snapshot)
                }
            }
            try catalog.delete(checkpointIDs: batch.map(\.id))
            report.deleted += batch.map(\.id)
        }
        return report
    }
}

/// A command was used wrongly (unknown name, bad argument): exit 64.
public struct UsageError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// For `writers check`: nothing is recorded.
struct NoJournal: CheckpointJournal {
    func begin(_ record: CheckpointRecord) async throws {}
    func writerState(_ name: String, type: String, state: WriterState, errorKind: WriterErrorKind,
                     error: String?, checkpointID: String) async {}
    func finish(_ record: CheckpointRecord) async throws {}
}
