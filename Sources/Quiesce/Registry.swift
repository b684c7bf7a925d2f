import QuiesceConfig
import QuiesceCore

/// The writers registered in `writers.d/`, each built or refused on its own.
public struct Registry: Sendable {
    public struct Entry: Sendable {
        public var file: String
        public var name: String?
        public var type: String?
        public var writer: (any Writer)?
        public var error: ConfigError?
        /// The drop-in's text as loaded (the writer was built from these bytes).
        public var specText: String?
    }

    public var directory: String
    public var entries: [Entry]

    public static func load(_ configuration: Configuration) -> Registry {
        let directory = WriterDirectory(path: configuration.writersDirectory)
        let entries = directory.load().map { loaded -> Entry in
            switch loaded {
            case .failure(let error):
                return Entry(file: error.file, error: error)
            case .success(let spec):
                do {
                    let (writer, common) = try WriterTypes.makeWriter(spec, defaultTimeout: configuration.freezeTimeout)
                    return Entry(file: spec.file, name: common.name, type: common.type, writer: writer, specText: spec.text)
                } catch let error as ConfigError {
                    var entry = Entry(file: spec.file, error: error)
                    if case .string(let name)? = spec.table["name"]?.value { entry.name = name }
                    if case .string(let type)? = spec.table["type"]?.value { entry.type = type }
                    return entry
                } catch {
                    return Entry(file: spec.file, error: ConfigError(file: spec.file, "\(error)"))
                }
            }
        }
        return Registry(directory: configuration.writersDirectory, entries: entries)
    }

    public var writers: [any Writer] { entries.compactMap(\.writer) }
    /// Each built writer's name and drop-in text, as loaded.
    public var specs: [(name: String, text: String)] {
        entries.compactMap { entry in
            guard entry.writer != nil, let name = entry.name, let text = entry.specText else { return nil }
            return (name, text)
        }
    }
    public var errors: [ConfigError] { entries.compactMap(\.error) }

    /// The spec file that defines a writer, for error messages.
    public func file(of name: String) -> String? { entries.first { $0.name == name }?.file }
}

/// `checkpoint` refuses to run with a bad drop-in rather than silently skip a writer.
public struct RegistryInvalid: Error, Sendable, CustomStringConvertible {
    public var errors: [ConfigError]
    public var description: String {
        "refusing to checkpoint: \(errors.count) writer spec(s) in the registry are invalid, and skipping a writer would make the snapshot inconsistent for its application\n"
            + errors.map { "       \($0)" }.joined(separator: "\n")
            + "\n       (fix or remove the file; `quiesce writers list` shows every writer)"
    }
}
