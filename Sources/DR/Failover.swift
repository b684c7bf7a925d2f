import CQuiesceSys
import Foundation
import QuiesceCore
import QuiesceReplication
import QuiesceSystem

/// What `quiesce failover promote` did.
public struct PromotionReport: Sendable, Codable, Equatable {
    /// What was done to one writer's application inside the promoted image.
    public struct WriterRecovery: Sendable, Codable, Equatable {
        public var writer: String
        public var type: String
        /// The data directory in the image, as the primary saw it (and the DR VM will).
        public var dataDirectory: String?
        /// Files written or removed, one line each.
        public var actions: [String]
    }

    public var store: String
    public var volume: String
    public var checkpoint: String
    /// When the checkpoint was taken on the primary: the promoted image holds the data up to then.
    public var checkpointTime: Date
    /// `newest verified` or `given` (`--checkpoint`).
    public var chosen: String
    /// The checkpoint's recorded verification: `verified`, `not verified` or `FAILED verification`.
    public var verification: String
    public var path: String
    /// An existing image at `path` was replaced (`--force`).
    public var replaced: Bool
    /// `reflink` (same filesystem as the store) or `sparse copy`.
    public var copiedBy: String
    public var imageSize: UInt64
    public var writers: [WriterRecovery]
    /// What the operator must still do or know before starting the VM.
    public var warnings: [String]
    public var seconds: Double
}

/// Why a promotion was refused or failed. `usage`: the command line asks for something it will
/// not do (exit 64); `store`: the store has no such checkpoint, or cannot be read (exit 9);
/// `failed`: the copy or its recovery files could not be made (exit 1), `path` left untouched.
public enum PromotionError: Error, Sendable, CustomStringConvertible {
    case usage(String)
    case store(String)
    case failed(String)

    public var description: String {
        switch self {
        case .usage(let text), .store(let text), .failed(let text): text
        }
    }
}

/// `quiesce failover promote`: materializes a received checkpoint as the live image of the DR VM.
///
/// The image is built at `PATH.partial` (a reflink clone when the store and `PATH` share a
/// filesystem, else a sparse copy), the writers' recovery files are written into it (mounted
/// privately), and only then is it fsynced and renamed to `PATH`: a crash or a failure leaves
/// `PATH` as it was. The store's checkpoint is never written.
public enum FailoverPromotion {
    /// - Parameters:
    ///   - checkpoint: an id, or nil for the newest checkpoint whose recorded verification passed.
    ///     A given id is promoted even if not verified (the report says so).
    ///   - force: replace an existing image at `path` (never one attached to a loop device).
    ///   - restoreCommand: for PostgreSQL writers in `backup-label` mode: the archive's
    ///     `restore_command`, written to `postgresql.auto.conf` with `recovery.signal`.
    public static func promote(store root: String, volume: String, to path: String, checkpoint: String? = nil,
                               force: Bool = false, restoreCommand: String? = nil) async throws -> PromotionReport {
        let started = ContinuousClock.now
        let store: DRStore
        do { store = try DRStore(root: root, create: false) } catch { throw PromotionError.store("\(error)") }
        let available = store.checkpoints(volume: volume)
        guard !available.isEmpty else {
            let volumes = store.volumes()
            throw PromotionError.store("the store \(store.root) has no checkpoint of volume \(volume)"
                + (volumes.isEmpty ? " (it has none at all)" : " (volumes: \(volumes.joined(separator: ", ")))"))
        }
        let verifier = DRVerifier(store: store)
        let id: String, chosen: String
        if let checkpoint {
            guard available.contains(checkpoint) else {
                throw PromotionError.store("the store has no checkpoint \(checkpoint) of volume \(volume) (it has \(describe(available)))")
            }
            id = checkpoint
            chosen = "given"
        } else {
            guard let newest = verifier.newestVerified(volume: volume) else {
                throw PromotionError.store("no checkpoint of volume \(volume) in \(store.root) is verified (it has \(describe(available))): "
                    + "run `quiesce dr verify --store \(store.root) --volume \(volume)` to verify the newest, "
                    + "or name one with --checkpoint ID to promote it unverified")
            }
            id = newest
            chosen = "newest verified"
        }
        let verification: String
        var warnings: [String] = []
        switch verifier.recorded(volume: volume, checkpoint: id) {
        case let result? where result.ok: verification = "verified"
        case let result?:
            verification = "FAILED verification"
            warnings.append("checkpoint \(id) FAILED verification on \(ISO8601DateFormatter().string(from: result.verifiedAt)): "
                            + result.failures.joined(separator: "; ") + "; its applications may not start")
        case nil:
            verification = "not verified"
            warnings.append("checkpoint \(id) was never verified: nobody has started its applications "
                            + "(`quiesce dr verify --store \(store.root) --checkpoint \(id)` would)")
        }
        if chosen == "newest verified", id != available.last! {
            warnings.append("newer checkpoints are not verified and were passed over: \(available.drop { $0 <= id }.joined(separator: ", "))")
        }
        let manifest: StoredCheckpoint
        do { manifest = try store.manifest(volume: volume, checkpoint: id) } catch { throw PromotionError.store("\(error)") }

        let destination = absolute(path)
        let replaced = try checkDestination(destination, force: force)
        let source = store.imagePath(volume: volume, checkpoint: id)
        let partial = destination + ".partial"
        unlink(partial)  // a stale one from an interrupted promote
        var report = PromotionReport(store: store.root, volume: volume, checkpoint: id, checkpointTime: manifest.record.startedAt,
                                     chosen: chosen, verification: verification, path: destination, replaced: replaced,
                                     copiedBy: "", imageSize: manifest.imageSize, writers: [], warnings: warnings, seconds: 0)
        do {
            report.copiedBy = try await copyImage(source, to: partial)
            let liveMount = manifest.environment?.volumes.first { $0.name == volume }?.mount
            let recovery = try await writeRecoveryFiles(manifest.record, image: partial, liveMount: liveMount,
                                                        volume: volume, restoreCommand: restoreCommand)
            report.writers = recovery.writers
            report.warnings += recovery.warnings
            try syncFile(partial)
            guard rename(partial, destination) == 0 else {
                throw PromotionError.failed("cannot rename \(partial) to \(destination): \(String(cString: strerror(errno)))")
            }
            try syncDirectory((destination as NSString).deletingLastPathComponent)
        } catch {
            unlink(partial)
            if let error = error as? PromotionError { throw error }
            throw PromotionError.failed("promoting checkpoint \(id) of \(volume) to \(destination) failed, \(destination) is untouched: \(error)")
        }
        report.seconds = (ContinuousClock.now - started).seconds
        return report
    }

    // MARK: Pieces

    static func describe(_ ids: [String]) -> String {
        ids.count <= 5 ? ids.joined(separator: ", ") : "\(ids.count) checkpoints, \(ids.first!) … \(ids.last!)"
    }

    static func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }

    /// Refuses an existing `path` without `force`, and always one in use (attached to a loop
    /// device: a running VM's disk or a mounted image). True when an image will be replaced.
    static func checkDestination(_ path: String, force: Bool) throws -> Bool {
        let directory = (path as NSString).deletingLastPathComponent
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw PromotionError.usage("\(directory) does not exist: create the directory for the image first")
        }
        var info = stat()
        guard lstat(path, &info) == 0 else { return false }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw PromotionError.usage("\(path) exists and is not a regular file: give the path of an image file")
        }
        guard force else {
            throw PromotionError.usage("\(path) already exists: promote never overwrites an image (it may be the live one); "
                + "pass --force to replace it, or give another path")
        }
        let resolved = realpath(path, nil).map { pointer in defer { free(pointer) }; return String(cString: pointer) } ?? path
        if let loop = LoopDevice.all().first(where: { $0.backing == resolved }) {
            let mounts = Mounts.mountPoints(of: loop.device)
            throw PromotionError.usage("\(path) is in use by \(loop.device)"
                + (mounts.isEmpty ? "" : " (mounted at \(mounts.joined(separator: ", ")))")
                + ": stop what uses it (the VM, a mount) before replacing it")
        }
        return true
    }

    /// A reflink clone when `source` and `destination` share a filesystem, else `cp --sparse=always`.
    static func copyImage(_ source: String, to destination: String) async throws -> String {
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw PromotionError.store("cannot open \(source): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw PromotionError.failed("cannot create \(destination): \(String(cString: strerror(errno)))") }
        let cloned = quiesce_ficlone(output, input) == 0
        let reason = errno
        close(output)
        if cloned { return "reflink" }
        unlink(destination)
        guard [EXDEV, EOPNOTSUPP, EINVAL, ENOTTY, ENOSYS].contains(reason) else {
            throw PromotionError.failed("cannot clone \(source) to \(destination): \(String(cString: strerror(reason)))")
        }
        let copy = try await ChildProcess.run("cp", ["--sparse=always", "--reflink=never", "--", source, destination], timeout: nil)
        guard copy.succeeded else {
            unlink(destination)
            throw PromotionError.failed("cannot copy \(source) to \(destination): \(copy.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        chmod(destination, 0o600)
        return "sparse copy"
    }

    /// Mounts `image` privately beside it and writes each writer's recovery files: for
    /// PostgreSQL, removes the primary's `postmaster.pid` and, in `backup-label` mode, writes
    /// `backup_label` (and `tablespace_map`) byte for byte, owned like the data directory, 0600.
    static func writeRecoveryFiles(_ record: CheckpointRecord, image: String, liveMount: String?, volume: String,
                                   restoreCommand: String?) async throws -> (writers: [PromotionReport.WriterRecovery], warnings: [String]) {
        let postgres = record.writers.filter { $0.type == "postgresql" }
        guard !postgres.isEmpty else { return ([], []) }
        guard let liveMount else {
            return ([], ["the manifest does not say where volume \(volume) is mounted on the primary: "
                         + "PostgreSQL's recovery files were not written (\(postgres.map(\.name).joined(separator: ", ")))"])
        }
        let work = try makeWorkDirectory(besides: image)
        let copy: MountedCopy
        do {
            copy = try await MountedCopy.mountInPlace([(volume: volume, image: image, liveMount: liveMount)], in: work)
        } catch {
            rmdir(work)
            throw error
        }
        var writers: [PromotionReport.WriterRecovery] = []
        var warnings: [String] = []
        var failure: (any Error)?
        let mountPoint = copy.volumes[0].mountPoint!
        for writer in postgres {
            do {
                let (recovery, notes) = try postgresRecovery(writer, layout: copy.layout, mountPoint: mountPoint,
                                                             restoreCommand: restoreCommand)
                if let recovery { writers.append(recovery) }
                warnings += notes
            } catch {
                failure = error
                break
            }
        }
        _ = try? await ChildProcess.run("sync", ["-f", mountPoint], timeout: .seconds(120))
        let problems = await copy.release()
        if failure == nil, !problems.isEmpty {
            failure = PromotionError.failed("cannot release \(image): \(problems.joined(separator: "; "))")
        }
        if let failure { throw failure }
        return (writers, warnings)
    }

    static func postgresRecovery(_ writer: WriterResult, layout: CopyLayout, mountPoint: String,
                                 restoreCommand: String?) throws -> (PromotionReport.WriterRecovery?, [String]) {
        let files = writer.recovery?.files ?? [:]
        let label = files[labelFile].flatMap { $0.isEmpty ? nil : $0 }
        let subject = "writer \(writer.name) (postgresql)"
        guard let live = writer.marker?["data_directory"] else {
            return (nil, ["\(subject): the checkpoint records no data_directory" + (label == nil ? "" : ": its backup_label was NOT written")])
        }
        guard let translated = layout.translate(live) else {
            // On another volume: promote that one too, its files are written there.
            return (nil, label == nil ? [] : ["\(subject): its data directory \(live) is not on this volume: promote the volume that holds it"])
        }
        var recovery = PromotionReport.WriterRecovery(writer: writer.name, type: writer.type, dataDirectory: live, actions: [])
        // Never follow a link out of the image: resolve inside it, then refuse what escapes.
        let resolve = { (path: String) in realpath(path, nil).map { pointer -> String in defer { free(pointer) }; return String(cString: pointer) } }
        let root = resolve(mountPoint) ?? mountPoint
        guard let directory = resolve(translated), directory == root || directory.hasPrefix(root + "/"),
              FileManager.default.fileExists(atPath: directory + "/PG_VERSION") else {
            throw PromotionError.failed("\(subject): the image has no PostgreSQL data directory at \(live) (no PG_VERSION, or a link out of the image)")
        }
        var info = stat()
        guard stat(directory, &info) == 0 else { throw PromotionError.failed("cannot stat \(live) in the image: \(String(cString: strerror(errno)))") }
        let owner = (uid: info.st_uid, gid: info.st_gid)

        if unlink(directory + "/postmaster.pid") == 0 {
            recovery.actions.append("removed the primary's postmaster.pid")
        }
        guard let label else {
            recovery.actions.append("checkpoint mode: nothing to write; PostgreSQL starts with a short crash recovery")
            return (recovery, [])
        }
        try writeOwned(Array(label.utf8), to: directory + "/" + labelFile, owner: owner)
        recovery.actions.append("wrote \(labelFile) (\(label.utf8.count) bytes, 0600, uid \(owner.uid))")
        let mapPath = directory + "/" + tablespaceMapFile
        if let map = files[tablespaceMapFile], !map.isEmpty {
            try writeOwned(Array(map.utf8), to: mapPath, owner: owner)
            recovery.actions.append("wrote \(tablespaceMapFile) (\(map.utf8.count) bytes, 0600)")
        } else if unlink(mapPath) == 0 {
            recovery.actions.append("removed a stale \(tablespaceMapFile)")
        }
        let stopLSN = files[stopLSNFile] ?? "?"
        guard let restoreCommand else {
            return (recovery, ["\(subject): PostgreSQL will not start on this image until it can fetch the WAL up to backup_stop_lsn \(stopLSN) "
                + "from the archive (\"WAL ends before end of online backup\"): set restore_command and create recovery.signal in \(live), "
                + "or promote again with --force --restore-command 'CMD'"])
        }
        let quoted = restoreCommand.replacingOccurrences(of: "'", with: "''")
        let autoConf = directory + "/postgresql.auto.conf"
        var text = (try? String(contentsOfFile: autoConf, encoding: .utf8)) ?? ""
        if !text.isEmpty, !text.hasSuffix("\n") { text += "\n" }
        text += "# Written by `quiesce failover promote` (checkpoint recovery from the archive).\nrestore_command = '\(quoted)'\n"
        try writeOwned(Array(text.utf8), to: autoConf, owner: owner)
        recovery.actions.append("set restore_command in postgresql.auto.conf")
        try writeOwned([], to: directory + "/recovery.signal", owner: owner)
        recovery.actions.append("created recovery.signal (replays the archive past backup_stop_lsn \(stopLSN), then promotes)")
        return (recovery, [])
    }

    // The PostgreSQL writer's recovery file names (PostgreSQLWriter.labelFile and friends).
    static let labelFile = "backup_label"
    static let tablespaceMapFile = "tablespace_map"
    static let stopLSNFile = "backup_stop_lsn"

    /// Writes `bytes` to `path` (never through a symbolic link), owned by `owner`, 0600, fsynced.
    static func writeOwned(_ bytes: [UInt8], to path: String, owner: (uid: uid_t, gid: gid_t)) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw PromotionError.failed("cannot write \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, bytes.count - done) }
            guard n > 0 else { throw PromotionError.failed("cannot write \(path): \(String(cString: strerror(errno)))") }
            done += n
        }
        guard fchown(fd, owner.uid, owner.gid) == 0, fchmod(fd, 0o600) == 0, fsync(fd) == 0 else {
            throw PromotionError.failed("cannot finish \(path): \(String(cString: strerror(errno)))")
        }
    }

    static func makeWorkDirectory(besides image: String) throws -> String {
        var template = Array("\((image as NSString).deletingLastPathComponent)/.quiesce-promote-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!).map { String(cString: $0) } }) else {
            throw PromotionError.failed("cannot create a mount point beside \(image): \(String(cString: strerror(errno)))")
        }
        return made
    }

    static func syncFile(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0, fsync(fd) == 0 else {
            let reason = String(cString: strerror(errno))
            if fd >= 0 { close(fd) }
            throw PromotionError.failed("fsync \(path): \(reason)")
        }
        close(fd)
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw PromotionError.failed("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw PromotionError.failed("fsync \(path): \(String(cString: strerror(errno)))") }
    }
}
