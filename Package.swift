// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "quiesce",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "quiesce", targets: ["quiesce"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // The receiver daemon's mutual-TLS transport (`quiesce serve`, `quiesce://` targets).
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        // System libraries, linked from the Debian -dev packages through pkg-config.
        .systemLibrary(name: "CSQLite", path: "Sources/CSQLite", pkgConfig: "sqlite3",
                       providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CLibPQ", path: "Sources/CLibPQ", pkgConfig: "libpq",
                       providers: [.apt(["libpq-dev"])]),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CXXHash", path: "Sources/CXXHash", pkgConfig: "libxxhash",
                       providers: [.apt(["libxxhash-dev"])]),
        .systemLibrary(name: "CLibCrypto", path: "Sources/CLibCrypto", pkgConfig: "libcrypto",
                       providers: [.apt(["libssl-dev"])]),
        // ioctls Swift cannot call directly (variadic ioctl): FIFREEZE, FITHAW, FICLONE, FIEMAP.
        .target(name: "CQuiesceSys", path: "Sources/CQuiesceSys"),

        // The contract: Writer, SnapshotProvider, the checkpoint model and the coordinator.
        .target(name: "QuiesceCore", dependencies: [
            "CQuiesceSys",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // A small SQLite connection over the system libsqlite3, shared by the catalog and the sqlite writer.
        .target(name: "QuiesceSQLite", dependencies: ["CSQLite"]),
        // quiesce.toml, writers.d/ drop-ins and their validation.
        .target(name: "QuiesceConfig", dependencies: ["QuiesceCore"]),
        // The checkpoint catalog (SQLite).
        .target(name: "QuiesceCatalog", dependencies: ["QuiesceCore", "QuiesceSQLite"]),
        // The watchdog process that holds the thaw duty.
        .target(name: "QuiesceGuard", dependencies: [
            "QuiesceCore", "CQuiesceSys",
            .product(name: "Logging", package: "swift-log"),
        ]),

        // Writers: one folder each, same shape.
        .target(name: "ExecWriter", dependencies: ["QuiesceCore", "QuiesceConfig"], path: "Sources/Writers/Exec"),
        .target(name: "SQLiteWriter", dependencies: ["QuiesceCore", "QuiesceConfig", "QuiesceSQLite"],
                path: "Sources/Writers/SQLite"),
        .target(name: "MailboxWriter", dependencies: ["QuiesceCore", "QuiesceConfig"],
                path: "Sources/Writers/Mailbox"),
        .target(name: "PostgreSQLWriter", dependencies: ["QuiesceCore", "QuiesceConfig", "CLibPQ"],
                path: "Sources/Writers/PostgreSQL"),

        // Snapshot providers.
        .target(name: "ReflinkProvider", dependencies: ["QuiesceCore", "CQuiesceSys"], path: "providers/reflink"),

        // Replication: the delta stream format, reading changed ranges, the DR store and
        // the send/receive sessions, over any byte pipe (a local receiver, ssh, TLS).
        .target(name: "QuiesceReplication", dependencies: [
            "QuiesceCore", "CZstd", "CXXHash", "CLibCrypto", "CQuiesceSys",
        ], path: "Sources/Replication"),
        // The mutual-TLS byte pipe between a sender and `quiesce serve` (SwiftNIO, swift-nio-ssl).
        .target(name: "ReplicationTLS", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
        ], path: "Sources/ReplicationTLS"),

        // Wiring: registry of writer types and providers, the checkpoint service the CLI calls.
        .target(name: "Quiesce", dependencies: [
            "QuiesceCore", "QuiesceConfig", "QuiesceCatalog", "QuiesceGuard",
            "ExecWriter", "SQLiteWriter", "PostgreSQLWriter", "MailboxWriter", "ReflinkProvider",
            "QuiesceReplication", "ReplicationTLS",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Loop devices, mounts, filesystems and system tools, for the lab and the DR side.
        .target(name: "QuiesceSystem", dependencies: ["QuiesceCore"]),
        // The DR side: verify a received checkpoint, DR tests, failover.
        .target(name: "QuiesceDR", dependencies: [
            "Quiesce", "QuiesceCore", "QuiesceConfig", "QuiesceReplication", "QuiesceSystem", "CQuiesceSys",
            .product(name: "Logging", package: "swift-log"),
        ], path: "Sources/DR"),
        // The embedded default world: loop devices, XFS datastore, guest filesystem, demo.
        .target(name: "QuiesceLab", dependencies: [
            "Quiesce", "QuiesceCore", "QuiesceSQLite", "QuiesceSystem", "QuiesceDR",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "quiesce", dependencies: [
            "Quiesce", "QuiesceLab", "QuiesceGuard", "QuiesceDR", "QuiesceSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),

        // Tests.
        .target(name: "QuiesceTestSupport", dependencies: ["Quiesce", "QuiesceLab", "QuiesceCore", "QuiesceSystem"],
                path: "Tests/QuiesceTestSupport"),
        .testTarget(name: "QuiesceCoreTests", dependencies: ["QuiesceCore", "QuiesceTestSupport", "Quiesce"]),
        .testTarget(name: "QuiesceConfigTests", dependencies: ["QuiesceConfig", "Quiesce", "QuiesceTestSupport"]),
        .testTarget(name: "QuiesceCatalogTests", dependencies: ["QuiesceCatalog", "QuiesceTestSupport"]),
        .testTarget(name: "WriterTests", dependencies: [
            "ExecWriter", "SQLiteWriter", "PostgreSQLWriter", "MailboxWriter", "QuiesceSQLite", "QuiesceConfig", "QuiesceTestSupport",
        ]),
        .testTarget(name: "IntegrationTests", dependencies: [
            "Quiesce", "QuiesceLab", "QuiesceTestSupport", "QuiesceSQLite", "ReflinkProvider", "QuiesceCatalog",
            "QuiesceReplication", "ReplicationTLS", "QuiesceSystem", "QuiesceDR",
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "ReplicationTests", dependencies: ["QuiesceReplication", "QuiesceTestSupport", "ReflinkProvider"]),
    ]
)
