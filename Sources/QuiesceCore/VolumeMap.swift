import Foundation

/// Maps a writer's paths to the volumes of the snapshot set, through their guest mounts.
public struct VolumeMap: Sendable {
    public let volumes: [Volume]

    public init(_ volumes: [Volume]) { self.volumes = volumes }

    /// The volume whose guest filesystem holds `path`, or nil.
    /// A path that does not exist yet (a `-wal` file) is placed by its nearest existing parent.
    /// A path on a filesystem mounted below a volume's mount is not on that volume.
    public func volume(holding path: String) -> Volume? {
        guard let (resolved, device) = Self.resolve(path) else { return nil }
        var best: (Volume, Int)?
        for volume in volumes {
            guard let mount = volume.mount, let (mountPath, mountDevice) = Self.resolve(mount) else { continue }
            let inside = resolved == mountPath || resolved.hasPrefix(mountPath == "/" ? "/" : mountPath + "/")
            guard inside, device == mountDevice else { continue }
            if best == nil || mountPath.count > best!.1 { best = (volume, mountPath.count) }
        }
        return best?.0
    }

    /// `vm1: /srv/vm1 (/datastore/vm1.img)`, one per line: shown when a path is on no volume.
    public var description: String {
        volumes.map { "\($0.name): \($0.mount ?? "(no mount)") (\($0.image))" }.joined(separator: "\n")
    }

    static func resolve(_ path: String) -> (String, UInt64)? {
        var candidate = path
        var suffix = ""
        while true {
            if let real = realpath(candidate, nil) {
                defer { free(real) }
                var info = stat()
                guard stat(real, &info) == 0 else { return nil }
                let base = String(cString: real)
                return (suffix.isEmpty ? base : (base == "/" ? "" : base) + suffix, UInt64(info.st_dev))
            }
            let parent = (candidate as NSString).deletingLastPathComponent
            guard parent != candidate, !parent.isEmpty else { return nil }
            suffix = "/" + (candidate as NSString).lastPathComponent + suffix
            candidate = parent
        }
    }
}
