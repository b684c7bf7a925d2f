import ExecWriter
import MailboxWriter
import PostgreSQLWriter
import QuiesceConfig
import QuiesceCore
import SQLiteWriter

/// Every writer type quiesce knows, by the spec's `type`.
public enum WriterTypes {
    public static let factories: [any WriterFactory] = [
        ExecWriterFactory(),
        SQLiteWriterFactory(),
        MailboxWriterFactory(),
        PostgreSQLWriterFactory(),
    ]

    public static var names: [String] { factories.map(\.type).sorted() }

    /// Builds a writer from a parsed spec, refusing unknown types and keys.
    public static func makeWriter(_ spec: WriterSpec, defaultTimeout: Duration) throws -> (any Writer, CommonWriterSettings) {
        let reader = SpecReader(spec)
        let common = try readCommonSettings(reader, defaultTimeout: defaultTimeout)
        guard let factory = factories.first(where: { $0.type == common.type }) else {
            throw reader.error("type", "unknown writer type \"\(common.type)\" (known: \(names.joined(separator: ", ")))")
        }
        return (try factory.make(reader, common: common), common)
    }
}
