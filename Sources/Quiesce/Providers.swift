import QuiesceConfig
import QuiesceCore
import ReflinkProvider

/// Every snapshot provider quiesce knows, by a volume's `provider`.
public enum Providers {
    public static let all: [String: any SnapshotProvider] = [
        "reflink": ReflinkProvider(),
    ]

    /// Refuses volumes whose provider is unknown.
    static func validate(_ configuration: Configuration) throws {
        for volume in configuration.volumes where all[volume.provider] == nil {
            throw ConfigError(file: configuration.file, key: "provider",
                              "volume \"\(volume.name)\" uses unknown provider \"\(volume.provider)\" (known: \(all.keys.sorted().joined(separator: ", ")))")
        }
    }
}
