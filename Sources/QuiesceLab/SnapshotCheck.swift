import Foundation
import Logging
import Quiesce
import QuiesceCore

/// Checks what a checkpoint's snapshot holds: clones the snapshot files (reflink, so the
/// snapshot itself stays untouched), attaches and mounts the clones, runs every writer's
/// `verify` against the marker it recorded at freeze, then unmounts, detaches and discards.
public struct SnapshotCheck: Sendable {
    public var scratchDirectory: String
    public var logger: Logger

    public init(scratchDirectory: String, logger: Logger) {
        self.scratchDirectory = scratchDirectory
        self.logger = logger
    }

    public struct WriterVerdict: Sendable, Codable {
        public var writer: String
        public var type: String
        public var ok: Bool
        public var details: [String]
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
        var mounts: [String: String] = [:]
        var attached: [(clone: String, device: String, mountPoint: String?)] = []
        do {
            for snapshot in record.snapshots {
                guard let volume = volumes.first(where: { $0.name == snapshot.volume }), let liveMount = volume.mount else { continue }
                let clone = "\((snapshot.path as NSString).deletingLastPathComponent)/.check-\(record.id)-\(getpid()).img"
                let copy = try await ChildProcess.run("cp", ["--reflink=always", snapshot.path, clone], timeout: .seconds(60))
                guard copy.succeeded else { throw LabError("could not clone \(snapshot.path): \(copy.stderr)") }
                chmod(clone, 0o600)
                let device = try await LoopDevice.attach(file: clone, readOnly: false)
                attached.append((clone, device, nil))
                let mountPoint = "\(scratchDirectory)/\(record.id)-\(snapshot.volume)"
                try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
                try await Mounts.mount(device: device, at: mountPoint, type: "ext4", options: nil)
                attached[attached.count - 1].mountPoint = mountPoint
                mounts[liveMount] = mountPoint
            }
            let layout = CopyLayout(mounts: mounts)
            for writerResult in record.writers {
                guard let marker = writerResult.marker else { continue }
                guard let writer = writers.first(where: { $0.name == writerResult.name }) else {
                    result.problems.append("writer \(writerResult.name) is no longer registered: not verified")
                    continue
                }
                do {
                    let report = try await writer.verify(copy: layout, marker: marker)
                    result.writers.append(WriterVerdict(writer: writer.name, type: writer.type, ok: report.ok, details: report.details))
                } catch {
                    result.writers.append(WriterVerdict(writer: writer.name, type: writer.type, ok: false, details: ["\(error)"]))
                }
            }
        } catch {
            result.problems.append("\(error)")
        }
        for item in attached.reversed() {
            if let mountPoint = item.mountPoint {
                do { try await Mounts.unmount(mountPoint) } catch { result.problems.append("\(error)") }
                try? FileManager.default.removeItem(atPath: mountPoint)
            }
            do { try await LoopDevice.detach(item.device) } catch { result.problems.append("\(error)") }
            unlink(item.clone)
        }
        result.ok = result.problems.isEmpty && result.writers.allSatisfy(\.ok)
        return result
    }
}
