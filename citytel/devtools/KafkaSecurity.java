// Applies citytel's Kafka users (SCRAM) and ACLs through the Admin API, idempotently. Run by
// `citytel stack up` as a single-file program (java -cp 'kafka/libs/*' KafkaSecurity.java ...):
// the Python client has no calls for either. Secrets come from files, never the command line.
//
//   args[0]  admin client properties (bootstrap, SASL_SSL, the admin's login)
//   args[1]  users: one "name<TAB>password-file" per line
//   args[2]  ACLs: one "principal<TAB>operation<TAB>resource-type<TAB>pattern-type<TAB>name" per line

import java.io.FileReader;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialAlteration;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class KafkaSecurity {
    public static void main(String[] args) throws Exception {
        Properties properties = new Properties();
        try (FileReader reader = new FileReader(args[0])) {
            properties.load(reader);
        }
        List<UserScramCredentialAlteration> users = new ArrayList<>();
        for (String line : Files.readAllLines(Path.of(args[1]))) {
            if (line.isBlank()) continue;
            String[] fields = line.split("\t");
            String password = Files.readString(Path.of(fields[1])).strip();
            ScramCredentialInfo info = new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192);
            users.add(new UserScramCredentialUpsertion(fields[0], info, password));
        }
        List<AclBinding> acls = new ArrayList<>();
        for (String line : Files.readAllLines(Path.of(args[2]))) {
            if (line.isBlank()) continue;
            String[] fields = line.split("\t");
            ResourcePattern resource = new ResourcePattern(
                ResourceType.fromString(fields[2]), fields[4], PatternType.fromString(fields[3]));
            AccessControlEntry entry = new AccessControlEntry(
                fields[0], "*", AclOperation.fromString(fields[1]), AclPermissionType.ALLOW);
            acls.add(new AclBinding(resource, entry));
        }
        try (Admin admin = Admin.create(properties)) {
            if (!users.isEmpty()) admin.alterUserScramCredentials(users).all().get();
            if (!acls.isEmpty()) admin.createAcls(acls).all().get();
        }
        System.out.println("kafka security: " + users.size() + " users, " + acls.size() + " ACLs applied");
    }
}
